"""The job on Flink (``--flink_master '[local]'``: a MiniCluster inside the job server JVM).

``--runner FlinkRunner --flink_master '[local]' --environment_type LOOPBACK``
with no other flag: scripts/fetch_flink.sh (run by scripts/ensure_venv.sh)
puts the job server in Beam's jar cache and beam_jobs/flink_runner.py finds
it. That job server is Beam 2.62.0 on Flink 1.19, the newest served here
(docs/flink.md), behind this 2.77 SDK.

What runs: file mode, byte-identical to the in-process runner; a bounded
Kafka job's scores, byte-identical too; the streaming job with
checkpointing every 5 s, every event scored (identically) and the offsets
committed while it runs, from bundle finalizers after checkpoints. What does
not (xfail, strict, so a fix shows): Flink runs a bounded job as a batch
job, whose stages have no bundle finalization, so the commit step's
finalizer fails the job after every score is written, and no offset is
committed. On a standalone cluster (deploy/start_flink_cluster.sh) file mode
with parallelism 2 gives the same scores. Not tested here because it fails: with checkpoints every 1 s the
streaming job reads nothing at all (docs/flink.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from beam_jobs import sensor_scoring
from beam_jobs.flink_runner import FETCHED_BEAM_VERSION, FETCHED_FLINK_VERSION, job_server_jar
from beam_jobs.replay import replay
from tests.runner_helpers import (
    EVENTS,
    JobProcess,
    all_committed,
    assert_identical,
    file_scores,
    kafka_job_args,
    kafka_scores,
    no_runner_left_behind,  # noqa: F401 (a fixture)
    record_line,
    score_files,
)

FLINK = ["--runner", "FlinkRunner", "--flink_master", "[local]", "--environment_type", "LOOPBACK"]
pytestmark = pytest.mark.usefixtures("no_runner_left_behind")


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    jar = job_server_jar(FETCHED_FLINK_VERSION, FETCHED_BEAM_VERSION)
    assert Path(jar).exists(), f"no Flink job server at {jar}: run scripts/fetch_flink.sh"
    return record_line(tmp_path_factory.mktemp("recording") / "line.avro")


def test_file_mode_on_flink_scores_byte_identical_to_the_in_process_runner(recording, tmp_path):
    direct = score_files(recording, tmp_path / "direct")
    flink = score_files(recording, tmp_path / "flink", *FLINK)
    assert_identical(file_scores(direct), file_scores(flink))


@pytest.fixture(scope="module")
def bounded_kafka_run(recording, broker, tmp_path_factory):
    """One bounded Kafka job on the in-process runner and one on Flink, same input; Flink's failure if any."""
    from transforms.kafka_client import KafkaConfig

    config = KafkaConfig(broker.bootstrap_servers)
    topic = lambda kind: f"flink-bounded-{kind}"  # noqa: E731
    replay([recording], config, topic("in"), partitions=2)
    sensor_scoring.run([*kafka_job_args(config, topic, "direct"), "--bounded"])
    failure = None
    try:
        sensor_scoring.run([*kafka_job_args(config, topic, "flink"), "--bounded", *FLINK])
    except RuntimeError as e:
        failure = e
    return config, topic, failure


@pytest.mark.slow
def test_bounded_kafka_job_on_flink_scores_every_event_like_the_in_process_runner(bounded_kafka_run):
    config, topic, _ = bounded_kafka_run
    assert_identical(kafka_scores(config, topic("direct-scores")), kafka_scores(config, topic("flink-scores")))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Flink batch has no bundle finalization: 'The ActiveBundle does not have a "
                                       "registered bundle finalization handler' fails the job, nothing is committed")
def test_bounded_kafka_job_on_flink_finishes_and_commits_the_end_offsets(bounded_kafka_run):
    config, topic, failure = bounded_kafka_run
    assert failure is None, str(failure).splitlines()[0]
    assert all_committed(config, topic("in"), topic("flink-group"))


@pytest.mark.slow
def test_streaming_job_on_flink_scores_every_event_and_commits_after_checkpoints(recording, tmp_path, kafka_config,
                                                                              topic_names):
    replay([recording], kafka_config, topic_names("in"), partitions=2)
    sensor_scoring.run([*kafka_job_args(kafka_config, topic_names, "direct"), "--bounded"])
    job = JobProcess([*kafka_job_args(kafka_config, topic_names, "flink"), *FLINK, "--checkpointing_interval", "5000",
                      "--status_interval_s", "0"], tmp_path / "job.log")
    try:
        job.wait_for(lambda: len(kafka_scores(kafka_config, topic_names("flink-scores"))) == EVENTS, 150,
                     "score for every event")
        job.wait_for(lambda: all_committed(kafka_config, topic_names("in"), topic_names("flink-group")), 60,
                     "commit of the end offsets")
    finally:
        job.stop()
    assert_identical(kafka_scores(kafka_config, topic_names("direct-scores")),
                     kafka_scores(kafka_config, topic_names("flink-scores")))


@pytest.fixture
def standalone_cluster(tmp_path):
    """deploy/start_flink_cluster.sh's cluster, one TaskManager with 2 slots, in a folder of the test's; stopped after."""
    env = dict(os.environ, FLINK_CLUSTER_DIR=str(tmp_path / "cluster"), REST_PORT=str(_free_port()))
    script = Path(__file__).resolve().parent.parent / "deploy" / "start_flink_cluster.sh"
    try:
        subprocess.run([str(script), "start"], env=env, check=True, timeout=300)
        yield f"localhost:{env['REST_PORT']}"
    finally:
        subprocess.run([str(script), "stop"], env=env, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_file_mode_on_a_standalone_cluster_with_parallelism_2_scores_like_the_in_process_runner(
        recording, tmp_path, standalone_cluster):
    direct = score_files(recording, tmp_path / "direct")
    flink = score_files(recording, tmp_path / "flink", "--runner", "FlinkRunner", "--flink_master", standalone_cluster,
                        "--environment_type", "LOOPBACK", "--parallelism", "2")
    assert_identical(file_scores(direct), file_scores(flink))
