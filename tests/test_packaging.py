"""What --setup_file stages to Flink workers: everything a worker needs and nothing else."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_staged_sdist_carries_schemas_and_model_but_no_tests(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    for needed in ("schemas/sensor_event.avsc", "schemas/registry.json", "schemas/history/sensor_event_v0.avsc",
                   "models/bundled/model.json", "models/bundled/head.pt", "beam_jobs/sensor_scoring.py",
                   "transforms/kafka_source.py"):
        assert needed in names, f"{needed} is not staged"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/", "deploy/"))]
