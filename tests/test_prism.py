"""The job on Prism, Beam's portable runner in Go: the in-process runner's scores, byte for byte.

``--runner PrismRunner`` with no other flag: scripts/fetch_prism.sh (run by
scripts/ensure_venv.sh) builds Prism once and beam_jobs/prism_runner.py
finds it. The workers are LOOPBACK, in this process (the streaming test:
in the job's process). Prism calls bundle finalizers in batch and in
streaming, so offsets are committed in both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_jobs import sensor_scoring
from beam_jobs.embedded_broker import free_port
from beam_jobs.prism_runner import prism_binary
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
from tests.test_event_time_job import drift_records, metric

# Beam keeps one Prism per process and reuses it; the tests stop theirs after each test (no_runner_left_behind),
# so each run gets its own.
PRISM = ["--runner", "PrismRunner", "--environment_type", "LOOPBACK", "--experiments", "disable_prism_server_singleton"]
pytestmark = pytest.mark.usefixtures("no_runner_left_behind")


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    assert Path(prism_binary()).exists(), f"no Prism at {prism_binary()}: run scripts/fetch_prism.sh"
    return record_line(tmp_path_factory.mktemp("recording") / "line.avro")


def test_file_mode_on_prism_scores_byte_identical_to_the_in_process_runner(recording, tmp_path):
    direct = score_files(recording, tmp_path / "direct")
    prism = score_files(recording, tmp_path / "prism", *PRISM)
    assert_identical(file_scores(direct), file_scores(prism))


def test_bounded_kafka_job_on_prism_scores_like_the_in_process_runner_and_commits_the_end_offsets(
        recording, tmp_path, kafka_config, topic_names):
    replay([recording], kafka_config, topic_names("in"), partitions=2)
    sensor_scoring.run([*kafka_job_args(kafka_config, topic_names, "direct"), "--bounded"])
    sensor_scoring.run([*kafka_job_args(kafka_config, topic_names, "prism"), "--bounded", *PRISM])
    assert_identical(kafka_scores(kafka_config, topic_names("direct-scores")),
                     kafka_scores(kafka_config, topic_names("prism-scores")))
    # Bundle finalizers ran: the group is at the end offsets (the in-process runner's is too).
    assert all_committed(kafka_config, topic_names("in"), topic_names("prism-group"))
    assert all_committed(kafka_config, topic_names("in"), topic_names("direct-group"))


@pytest.mark.slow
def test_streaming_job_on_prism_scores_commits_closes_windows_and_reclaims_devices(
        recording, tmp_path, kafka_config, topic_names):
    """Beam's semantics on Prism: the plain path's drift windows (FixedWindows + combine) close and the device
    timers reclaim every idle device while the job runs, once the idle partitions' watermark moves on."""
    streaming_flags = ["--drift_window_s", "10", "--state_ttl_s", "20"]
    replay([recording], kafka_config, topic_names("in"), partitions=2)
    sensor_scoring.run([*kafka_job_args(kafka_config, topic_names, "direct"), "--bounded", *streaming_flags])
    port = free_port()
    job = JobProcess([*kafka_job_args(kafka_config, topic_names, "prism"), *PRISM, *streaming_flags,
                      "--metrics_port", str(port)], tmp_path / "job.log")
    expected_drift = drift_records(kafka_config, topic_names("direct-drift"))
    try:
        job.wait_for(lambda: len(kafka_scores(kafka_config, topic_names("prism-scores"))) == EVENTS, 90,
                     "score for every event")
        job.wait_for(lambda: all_committed(kafka_config, topic_names("in"), topic_names("prism-group")), 30,
                     "commit of the end offsets")
        job.wait_for(lambda: len(drift_records(kafka_config, topic_names("prism-drift"))) == len(expected_drift),
                     90, "every drift window closed")
        job.wait_for(lambda: metric(port, "sensor_scoring_devices_expired_total") == 8, 90, "idle devices reclaimed")
        assert job.process.poll() is None, "a streaming job runs until stopped"
    finally:
        job.stop()
    assert_identical(kafka_scores(kafka_config, topic_names("direct-scores")),
                     kafka_scores(kafka_config, topic_names("prism-scores")))
    assert drift_records(kafka_config, topic_names("prism-drift")) == expected_drift
