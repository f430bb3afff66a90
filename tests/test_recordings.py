"""Recording files, the record tool and the replay tool, against the real broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fastavro
import pytest

from beam_jobs import record as record_tool
from beam_jobs.record import Bound, parse_bound, record
from beam_jobs.recordings import (
    RecordedSource, RecordingError, count_events, merged_events, read_events, read_sources, sources_path,
    write_events,
)
from beam_jobs.replay import replay
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from schemas.serde import EVENT, SCHEMA_DIR, AvroDecoder, AvroEncoder, SerdeError
from tests.kafka_helpers import produce_all, read_all
from transforms.kafka_client import ensure_topics, make_consumer, partitions_of


def simulated(devices: int, steps: int, seed: int = 0) -> list[dict]:
    return [e for e, _ in LineSimulator(SimulatorConfig(devices=devices, seed=seed)).take(devices * steps)]


def test_round_trip_keeps_events_and_sources(tmp_path):
    events = simulated(3, 20)
    sources = [RecordedSource("t", i % 2, i, e["event_time"] + 5) for i, e in enumerate(events)]
    path = tmp_path / "r.avro"
    assert write_events(path, events, sources=sources) == 60
    assert list(read_events(path)) == events
    assert list(read_sources(path)) == sources
    assert count_events([path, path]) == 120
    with open(path, "rb") as f:  # any Avro reader sees SensorEvents of the current schema
        assert fastavro.reader(f).writer_schema["name"] == "sensors.SensorEvent"


def test_rewrite_without_sources_drops_the_stale_sidecar(tmp_path):
    path = tmp_path / "r.avro"
    events = simulated(1, 3)
    write_events(path, events, sources=[RecordedSource("t", 0, i, 0) for i in range(3)])
    write_events(path, events[:1])
    assert not sources_path(path).exists()
    with pytest.raises(RecordingError, match="no sidecar"):
        list(read_sources(path))


def test_mismatched_sources_and_bad_events_are_refused(tmp_path):
    events = simulated(1, 3)
    with pytest.raises(SerdeError, match="cannot write"):
        write_events(tmp_path / "a.avro", events, sources=[RecordedSource("t", 0, 0, 0)])
    with pytest.raises(SerdeError, match="cannot write event 1"):
        write_events(tmp_path / "b.avro", [{"event_id": "x"}])


def test_older_schema_recording_resolves_to_the_current_schema(tmp_path):
    v0 = json.loads((SCHEMA_DIR / "history" / "sensor_event_v0.avsc").read_text())
    path = tmp_path / "v0.avro"
    with open(path, "wb") as f:
        fastavro.writer(f, v0, [{"event_id": "e", "device_id": "d", "event_time": 1_700_000_000_123,
                                 "readings": {"t": 1.5}}])
    assert list(read_events(path)) == [{"event_id": "e", "device_id": "d", "event_time": 1_700_000_000_123,
                                        "readings": {"t": 1.5}}]


def test_missing_files_and_globs_fail_clearly(tmp_path):
    with pytest.raises(RecordingError, match="no file matches"):
        list(read_events(str(tmp_path / "*.avro")))
    with pytest.raises(RecordingError, match="does not exist"):
        list(read_events(tmp_path / "absent.avro"))
    (tmp_path / "junk.avro").write_bytes(b"not avro")
    with pytest.raises(RecordingError, match="not a readable"):
        list(read_events(tmp_path / "junk.avro"))


def test_merged_events_interleave_files_by_time_keeping_each_files_order(tmp_path):
    events = simulated(2, 10)
    write_events(tmp_path / "a.avro", [e for e in events if e["device_id"].endswith("000")])
    write_events(tmp_path / "b.avro", [e for e in events if e["device_id"].endswith("001")])
    merged = list(merged_events(str(tmp_path / "*.avro")))
    assert [e["event_time"] for e in merged] == sorted(e["event_time"] for e in events)
    assert [e for e in merged if e["device_id"].endswith("000")] == events[::2]


def test_parse_bound():
    assert parse_bound("1500") == Bound(None, {None: 1500})
    assert parse_bound("0:10,2:30") == Bound(None, {0: 10, 2: 30})
    assert parse_bound("2023-11-14T22:13:20Z") == Bound(1_700_000_000_000, {})
    assert parse_bound("2023-11-14T22:13:20") == Bound(1_700_000_000_000, {})
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_bound("yesterday")


@pytest.fixture
def filled_topic(kafka_config, topic_names):
    """A 3-partition topic of 4 devices x 30 steps keyed by device, timestamps = event times, one junk message."""
    events = simulated(4, 30)
    encode = AvroEncoder(EVENT)
    topic = topic_names("in")
    ensure_topics(kafka_config, [topic], partitions=3)
    produce_all(kafka_config, topic, [(e["device_id"].encode(), encode(e), e["event_time"]) for e in events]
                + [(b"x", b"junk", events[-1]["event_time"])])
    return topic, events


def test_record_merges_partitions_by_time_and_keeps_positions(kafka_config, filled_topic, tmp_path):
    topic, events = filled_topic
    path = tmp_path / "rec.avro"
    written, skipped = record(kafka_config, topic, str(path))
    assert written == len(events) and len(skipped) == 1 and "junk" not in skipped[0]
    recorded, sources = list(read_events(path)), list(read_sources(path))
    assert sorted(recorded, key=lambda e: e["event_id"]) == sorted(events, key=lambda e: e["event_id"])
    assert [s.timestamp_ms for s in sources] == sorted(s.timestamp_ms for s in sources)
    assert [s.timestamp_ms for s in sources] == [e["event_time"] for e in recorded]
    for partition in {s.partition for s in sources}:
        offsets = [s.offset for s in sources if s.partition == partition]
        assert offsets == sorted(offsets)
    for device in {e["device_id"] for e in events}:
        assert [e for e in recorded if e["device_id"] == device] == [e for e in events if e["device_id"] == device]


def test_record_bounds_by_offsets_and_time(kafka_config, filled_topic, tmp_path):
    topic, events = filled_topic
    record(kafka_config, topic, str(tmp_path / "all.avro"))
    fullest = max(range(3), key=[s.partition for s in read_sources(tmp_path / "all.avro")].count)
    record(kafka_config, topic, str(tmp_path / "o.avro"), parse_bound("5"), parse_bound(f"{fullest}:15"))
    sources = list(read_sources(tmp_path / "o.avro"))
    assert min(s.offset for s in sources) == 5
    assert max(s.offset for s in sources if s.partition == fullest) == 14
    first = events[0]["event_time"]
    start, stop = Bound(first + 10_000, {}), Bound(first + 20_000, {})
    written, _ = record(kafka_config, topic, str(tmp_path / "t.avro"), start, stop)
    assert written == 4 * 10
    assert {e["event_time"] for e in read_events(tmp_path / "t.avro")} == {first + s * 1000 for s in range(10, 20)}


def test_record_cli_reports_and_fails_clearly(kafka_config, filled_topic, tmp_path, capsys):
    topic, events = filled_topic
    out = tmp_path / "cli.avro"
    record_tool.main(["--bootstrap_servers", kafka_config.bootstrap_servers, "--topic", topic, "--output", str(out)])
    assert f"wrote {len(events)} events" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        record_tool.main(["--output", str(out), "--from", "soon"])
    assert exit_info.value.code == 2 and "ISO 8601" in capsys.readouterr().err


def test_replay_keys_by_device_and_stamps_event_time(kafka_config, topic_names, tmp_path):
    events = simulated(5, 20)
    write_events(tmp_path / "r.avro", events)
    topic = topic_names("replayed")
    assert replay([tmp_path / "r.avro"], kafka_config, topic, partitions=3) == 100
    consumer = make_consumer(kafka_config)
    assert len(partitions_of(consumer, topic)) == 3
    consumer.close()
    decode = AvroDecoder(EVENT)
    raw = read_all(kafka_config, topic)
    by_device: dict[str, list] = {}
    for partition, _, key, value in raw:
        event = decode(value)
        assert key == event["device_id"].encode()
        by_device.setdefault(event["device_id"], []).append((partition, event))
    for device, rows in by_device.items():
        assert len({p for p, _ in rows}) == 1
        assert [e for _, e in rows] == [e for e in events if e["device_id"] == device]
    consumer = make_consumer(kafka_config)
    consumer.assign(partitions_of(consumer, topic))
    consumer.seek_to_beginning()
    stamps = [(r.timestamp, decode(r.value)["event_time"]) for batch in consumer.poll(timeout_ms=2000).values()
              for r in batch]
    consumer.close()
    assert stamps and all(ts == et for ts, et in stamps)


def test_replay_paces_by_speed_and_shifts_to_now(kafka_config, topic_names, tmp_path):
    events = simulated(2, 21)  # 20 s of event time
    write_events(tmp_path / "r.avro", events)
    started = time.monotonic()
    replay([tmp_path / "r.avro"], kafka_config, topic_names("paced"), speed=20.0, shift_to_now=True)
    assert 0.9 <= time.monotonic() - started < 5.0
    replayed = [e for *_, e in read_all(kafka_config, topic_names("paced"), AvroDecoder(EVENT))]
    offset = min(e["event_time"] for e in replayed) - events[0]["event_time"]
    assert abs(events[0]["event_time"] + offset - time.time() * 1000) < 10_000
    assert sorted(e["event_time"] - offset for e in replayed) == sorted(e["event_time"] for e in events)


def test_replay_of_a_missing_file_fails_before_touching_kafka(kafka_config):
    with pytest.raises(RecordingError):
        replay([Path("/nonexistent/r.avro")], kafka_config, "never-created")
