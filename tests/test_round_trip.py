"""Done-when test of issue 6: record -> replay -> score -> compare, end to end on Apache Kafka.

A fleet writes to Kafka and the job scores it; the topic is recorded with the
record tool, replayed into a fresh topic with the replay tool and scored
again, and scored once more in file mode. The compare tool must find all
three runs equal.
"""

from __future__ import annotations

from pathlib import Path

import fastavro
import pytest

from beam_jobs import compare, record, replay
from beam_jobs.recordings import read_sources
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from schemas.serde import EVENT, SCORE, AvroDecoder, AvroEncoder, current_schema
from tests.kafka_helpers import produce_all, read_all
from tests.test_file_mode import FLOAT_NOISE, score_file_mode
from tests.test_job import run_job
from transforms.kafka_client import ensure_topics

pytestmark = pytest.mark.apache_kafka  # the product's path end to end, on the broker production runs
CALIBRATION = ("--calibration_events", "30")


def scores_to_file(kafka_config, topic: str, path: Path) -> int:
    """The score topic as an Avro file, the form the compare tool reads."""
    scores = [s for *_, s in read_all(kafka_config, topic, AvroDecoder(SCORE))]
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(current_schema(SCORE)), scores)
    return len(scores)


def assert_same_scores(a: Path, b: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(a), str(b), "--tolerance", str(FLOAT_NOISE)])
    assert exit_info.value.code == 0, f"{b} differs from {a}: see the summary above"


@pytest.mark.slow
def test_record_replay_score_compare(kafka_config, topic_names, tmp_path, capsys):
    events = [e for e, _ in LineSimulator(SimulatorConfig(devices=6, seed=2, fault_rate_per_hour=20)).take(600)]
    encode = AvroEncoder(EVENT)
    ensure_topics(kafka_config, [topic_names("in")], partitions=3)
    produce_all(kafka_config, topic_names("in"),
                [(e["device_id"].encode(), encode(e), e["event_time"]) for e in events])
    run_job(kafka_config, topic_names, *CALIBRATION)
    live = tmp_path / "live.avro"
    assert scores_to_file(kafka_config, topic_names("scores"), live) == 600

    recording = tmp_path / "recording.avro"
    servers = ("--bootstrap_servers", kafka_config.bootstrap_servers)
    record.main([*servers, "--topic", topic_names("in"), "--output", str(recording)])
    assert len(list(read_sources(recording))) == 600
    replayed_names = lambda kind: topic_names(f"replayed-{kind}")  # noqa: E731
    replay.main(["--input", str(recording), *servers, "--topic", replayed_names("in"), "--speed", "0"])
    assert "sent 600 events" in capsys.readouterr().err
    run_job(kafka_config, replayed_names, *CALIBRATION)
    replayed = tmp_path / "replayed.avro"
    assert scores_to_file(kafka_config, replayed_names("scores"), replayed) == 600

    from_files = score_file_mode(str(recording), tmp_path / "files", *CALIBRATION)

    assert_same_scores(live, replayed)
    assert_same_scores(live, from_files)
    assert "MATCH" in capsys.readouterr().out
