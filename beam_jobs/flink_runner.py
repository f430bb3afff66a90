"""The FlinkRunner's job server, found in Beam's jar cache without a flag.

Beam's FlinkRunner starts a Java job server, ``java -jar
beam-runners-flink-<flink>-job-server-<sdk version>.jar``, which it takes from
its jar cache (``~/.apache_beam/cache/jars``) or downloads. No such jar is
served for this SDK's version (2.77.0), so ``scripts/fetch_flink.sh`` builds
the newest that resolves, Flink 1.19 with Beam 2.62.0, into that cache;
:func:`configure` points the runner at it when no ``--flink_job_server_jar``
is given and the SDK's own jar is not there, and gives the job server JVM a
small heap. With ``--flink_master '[local]'`` the job server runs a Flink
MiniCluster inside that JVM.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from apache_beam.options.pipeline_options import FlinkRunnerOptions, JobServerOptions, PipelineOptions, PortableOptions
from apache_beam.utils.subprocess_server import JavaJarServer
from apache_beam.version import __version__ as beam_version

from beam_jobs.options import SensorScoringOptions

# What scripts/fetch_flink.sh fetches: the newest (Flink, Beam) job server whose Maven dependencies resolve here.
FETCHED_FLINK_VERSION = "1.19"
FETCHED_BEAM_VERSION = "2.62.0"
_LOG = logging.getLogger(__name__)
# The job server JVM's heap, MiniCluster included: the file-mode job peaked at 527 MiB resident with it
# (docs/flink.md); Java's default heap, a quarter of the machine's memory, is too much on a shared 2-core machine.
JOB_SERVER_JVM_PROPERTIES = ["-Xmx768m", "-XX:+UseSerialGC"]
# How long a TaskManager keeps its Python workers after its last task ends (configure's docstring).
ENVIRONMENT_CACHE_MS = 10_000


def is_flink(runner: Optional[str]) -> bool:
    """True for Beam's FlinkRunner by either of its names."""
    return runner is not None and runner.split(".")[-1] == "FlinkRunner"


def job_server_jar(flink_version: str, version: str, cache_dir: Optional[str] = None) -> str:
    """Where the SDK looks for the job server of `flink_version` at Beam `version`: its jar cache."""
    artifact = f"beam-runners-flink-{flink_version}-job-server"
    return os.path.join(cache_dir or JavaJarServer.JAR_CACHE, JavaJarServer.jar_name(artifact, version))


def configure(options: PipelineOptions) -> None:
    """Points a FlinkRunner without ``--flink_job_server_jar`` at the fetched job server, with a small heap.

    It keeps a TaskManager's Python workers for ``ENVIRONMENT_CACHE_MS``
    after its last task ends, unless ``--environment_cache_millis`` says
    otherwise: Beam's default (0) closes them as soon as no task holds them,
    and on a cluster a batch job's next stage then started on a closing
    worker now and then ("SDK harness closed connection"; the retried
    FinalizeWrite found its files gone and the job failed).

    It also finishes bundles before checkpoint barriers unless told otherwise:
    Beam's Flink operators otherwise keep the output of a bundle cut by a
    checkpoint in operator state until their next element, and the stage that
    lists the partitions has one element only, so a checkpoint during the
    first bundle (a slow worker start) left the job reading nothing.
    """
    job = options.view_as(SensorScoringOptions)
    if job.finish_bundle_before_checkpointing is None:
        job.finish_bundle_before_checkpointing = True
    portable = options.view_as(PortableOptions)
    if not portable.environment_cache_millis:
        portable.environment_cache_millis = ENVIRONMENT_CACHE_MS
    flink = options.view_as(FlinkRunnerOptions)
    server = options.view_as(JobServerOptions)
    if not server.job_server_jvm_properties:
        server.job_server_jvm_properties = list(JOB_SERVER_JVM_PROPERTIES)
    if flink.flink_job_server_jar or os.path.exists(job_server_jar(flink.flink_version, beam_version,
                                                                   server.jar_cache_dir)):
        return
    fetched = job_server_jar(FETCHED_FLINK_VERSION, FETCHED_BEAM_VERSION, server.jar_cache_dir)
    if os.path.exists(fetched):
        _LOG.info("Flink job server: %s (Flink %s, Beam %s), the cluster must run Flink %s",
                  fetched, FETCHED_FLINK_VERSION, FETCHED_BEAM_VERSION, FETCHED_FLINK_VERSION)
        flink.flink_job_server_jar = fetched
        flink.flink_version = FETCHED_FLINK_VERSION
