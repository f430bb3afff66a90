"""Portability: the portable runner (what Flink runs behind) gives the DirectRunner's scores.

``--runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK``
starts Beam's Java-free embedded job service in this process, with the SDK
harness as a loopback worker: the pipeline goes through the Runner API and
Fn API exactly as it does on Flink, so a DirectRunner-only shortcut (a
non-serialisable DoFn, an unportable coder, a runner-specific transform)
fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_jobs import sensor_scoring
from beam_jobs.compare import compare_files, compare_scores, scores_by_event, summary
from beam_jobs.recordings import write_events
from beam_jobs.replay import replay
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from schemas.serde import SCORE, AvroDecoder
from tests.kafka_helpers import read_all

PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]
# Scores are float32 head outputs widened to double; batches of different
# sizes may round differently in the last bit.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recording") / "line.avro"
    write_events(path, (event for event, _ in LineSimulator(SimulatorConfig(devices=8, seed=5)).take(1200)))
    return path


def score_files(recording: Path, output_dir: Path, *runner: str) -> Path:
    sensor_scoring.run(["--input_files", str(recording), "--output_dir", str(output_dir),
                        "--calibration_events", "30", *runner])
    return output_dir / "scores-00000-of-00001.avro"


@pytest.mark.slow
def test_file_mode_on_the_portable_runner_scores_like_the_direct_runner(recording, tmp_path):
    direct = score_files(recording, tmp_path / "direct")
    portable = score_files(recording, tmp_path / "portable", *PORTABLE)
    result = compare_files(direct, portable)
    assert result.compared == 1200, summary(result, TOLERANCE)
    assert result.within(TOLERANCE), summary(result, TOLERANCE)


@pytest.mark.slow
def test_bounded_kafka_job_on_the_portable_runner_scores_like_file_mode(recording, tmp_path, kafka_config,
                                                                         topic_names):
    replay([recording], kafka_config, topic_names("in"), partitions=2)
    sensor_scoring.run([
        "--bootstrap_servers", kafka_config.bootstrap_servers, "--bounded", "--input_topic", topic_names("in"),
        "--score_topic", topic_names("scores"), "--dead_letter_topic", topic_names("dead"),
        "--drift_topic", topic_names("drift"), "--consumer_group", topic_names("group"),
        "--calibration_events", "30", *PORTABLE,
    ])
    from_kafka = {s["event_id"]: s for *_, s in read_all(kafka_config, topic_names("scores"), AvroDecoder(SCORE))}
    from_files = score_files(recording, tmp_path / "direct")
    result = compare_scores(scores_by_event(from_files)[0], from_kafka)
    assert result.compared == 1200, summary(result, TOLERANCE)
    assert result.within(TOLERANCE), summary(result, TOLERANCE)
