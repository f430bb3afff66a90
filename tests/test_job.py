"""The whole job, bounded and streaming, against Apache Kafka, fed by an outside producer.

The producer here knows only the .avsc files in schemas/: it encodes with
fastavro directly, as another team's gateway would.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import fastavro
import numpy as np
import pytest

from beam_jobs import sensor_scoring
from schemas.serde import DEAD_LETTER, SCORE, AvroDecoder
from tests.kafka_helpers import committed_offsets, produce_all, read_all
from transforms.kafka_client import end_offsets, ensure_topics, make_consumer, partitions_of

pytestmark = pytest.mark.apache_kafka  # the product's path end to end, on the broker production runs
ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
START_MS = 1_750_000_000_000
FEATURES = ("temperature", "vibration", "current", "pressure", "flow", "voltage")


def _schema(name: str):
    return fastavro.parse_schema(json.loads((SCHEMAS / name).read_text()))


def _avro(schema, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def outside_events(devices: int, per_device: int, seed: int = 1) -> list[dict]:
    """Valid events, some readings null, interleaved across devices in time order."""
    rng = np.random.default_rng(seed)
    events = []
    for step in range(per_device):
        for d in range(devices):
            readings = {f: (None if rng.random() < 0.05 else float(rng.normal(50 + d, 2))) for f in FEATURES}
            events.append({"event_id": f"dev{d:02d}-{step}", "device_id": f"dev{d:02d}",
                           "event_time": START_MS + step * 1000, "readings": readings})
    return events


def malformed_messages(n: int, schema) -> list[bytes]:
    """Bytes that are not valid events for different reasons."""
    kinds = [
        lambda i: b"\x00garbage" + bytes([i % 256]),
        lambda i: _avro(schema, {"event_id": f"x{i}", "device_id": "", "event_time": START_MS, "readings": {}}),
        lambda i: _avro(schema, {"event_id": f"x{i}", "device_id": "d", "event_time": START_MS,
                                 "readings": {"temperature": float("nan")}}),
        lambda i: _avro(schema, {"event_id": f"x{i}", "device_id": "d", "event_time": 4_000_000_000_000,
                                 "readings": {}}),
        lambda i: _avro(schema, {"event_id": f"x{i}", "device_id": "d", "event_time": START_MS,
                                 "readings": {"temperature": 1e300}})[:-3],
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def run_job(kafka_config, names, *extra: str) -> None:
    sensor_scoring.run([
        "--bootstrap_servers", kafka_config.bootstrap_servers, "--bounded", "--start_from", "committed",
        "--input_topic", names("in"), "--score_topic", names("scores"), "--dead_letter_topic", names("dead"),
        "--drift_topic", names("drift"), "--consumer_group", names("group"), *extra,
    ])


@pytest.mark.slow
def test_outside_producer_bounded_run(kafka_config, topic_names):
    schema = _schema("sensor_event.avsc")
    events = outside_events(devices=40, per_device=100)
    bad = malformed_messages(100, schema)
    ensure_topics(kafka_config, [topic_names("in")], partitions=4)
    messages = [(e["device_id"].encode(), _avro(schema, e), e["event_time"]) for e in events]
    # Bad records interleaved with good ones, in every partition.
    for i, value in enumerate(bad):
        messages.insert(i * 40, (f"bad{i}".encode(), value, None))
    produce_all(kafka_config, topic_names("in"), messages)

    run_job(kafka_config, topic_names)

    scores = read_all(kafka_config, topic_names("scores"), AvroDecoder(SCORE))
    ids = [s["event_id"] for _, _, _, s in scores]
    assert len(ids) == len(set(ids)) == 4000
    assert set(ids) == {e["event_id"] for e in events}
    per_device = defaultdict(list)
    for partition, offset, key, score in scores:
        assert key == score["device_id"].encode()
        per_device[score["device_id"]].append(score["event_time"])
    assert len(per_device) == 40
    assert all(times == sorted(times) for times in per_device.values())

    dead = read_all(kafka_config, topic_names("dead"), AvroDecoder(DEAD_LETTER))
    assert len(dead) == 100
    assert sorted(d["value"] for *_, d in dead) == sorted(bad)
    assert all(d["error"] and d["stage"] in ("decode", "validate") for *_, d in dead)

    consumer = make_consumer(kafka_config)
    ends = end_offsets(consumer, partitions_of(consumer, topic_names("in")))
    consumer.close()
    committed = committed_offsets(kafka_config, topic_names("in"), topic_names("group"))
    assert committed == {tp.partition: end for tp, end in ends.items()}


@pytest.mark.slow
def test_scores_explain_themselves(kafka_config, topic_names):
    schema = _schema("sensor_event.avsc")
    events = outside_events(devices=3, per_device=120)
    events[-1]["readings"]["temperature"] = None
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    produce_all(kafka_config, topic_names("in"), [(e["device_id"].encode(), _avro(schema, e), None) for e in events])

    run_job(kafka_config, topic_names, "--calibration_events", "50")

    scores = {s["event_id"]: s for *_, s in read_all(kafka_config, topic_names("scores"), AvroDecoder(SCORE))}
    last = scores[events[-1]["event_id"]]
    assert "temperature" in last["imputed"]
    assert last["contributions"]["temperature"] == 0.0
    assert sum(last["contributions"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(last["contributions"]) == set(FEATURES)
    calibrating = [s for s in scores.values() if s["event_time"] < START_MS + 50_000]
    assert calibrating and not any(s["is_anomaly"] for s in calibrating)
    assert all(s["threshold"] > 0 and s["model_version"] for s in scores.values())


@pytest.mark.slow
def test_confluent_framing_and_schema_evolution(kafka_config, topic_names):
    """Events from older (v0, id 4) and newer (v2, id 5) producers are resolved, not dead-lettered."""
    registry = json.loads((SCHEMAS / "registry.json").read_text())
    ids = {entry["file"]: entry["id"] for entry in registry["schemas"]}
    writers = [(ids[f], _schema(f)) for f in ("sensor_event.avsc", "history/sensor_event_v0.avsc",
                                                "history/sensor_event_v2.avsc")]
    events = outside_events(devices=4, per_device=30)
    messages = []
    for i, event in enumerate(events):
        schema_id, schema = writers[i % 3]
        if schema_id == ids["history/sensor_event_v0.avsc"]:
            event["readings"] = {k: (0.0 if v is None else v) for k, v in event["readings"].items()}
        if schema_id == ids["history/sensor_event_v2.avsc"]:
            event = {**event, "firmware": "2.1.0"}
        messages.append((event["device_id"].encode(), struct.pack(">bI", 0, schema_id) + _avro(schema, event), None))
    messages.append((None, struct.pack(">bI", 0, 999) + b"\x02a", None))
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    produce_all(kafka_config, topic_names("in"), messages)

    run_job(kafka_config, topic_names, "--wire_format", "confluent")

    scores = read_all(kafka_config, topic_names("scores"), AvroDecoder(SCORE, "confluent"))
    assert {s["event_id"] for *_, s in scores} == {e["event_id"] for e in events}
    dead = read_all(kafka_config, topic_names("dead"), AvroDecoder(DEAD_LETTER, "confluent"))
    assert len(dead) == 1 and "999" in dead[0][3]["error"]


@pytest.mark.slow
def test_restart_resumes_from_committed_offsets(kafka_config, topic_names):
    schema = _schema("sensor_event.avsc")
    events = outside_events(devices=5, per_device=40)
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    first, second = events[:100], events[100:]
    produce_all(kafka_config, topic_names("in"), [(e["device_id"].encode(), _avro(schema, e), None) for e in first])
    run_job(kafka_config, topic_names)
    produce_all(kafka_config, topic_names("in"), [(e["device_id"].encode(), _avro(schema, e), None) for e in second])
    run_job(kafka_config, topic_names)

    ids = [s["event_id"] for *_, s in read_all(kafka_config, topic_names("scores"), AvroDecoder(SCORE))]
    assert sorted(ids) == sorted(e["event_id"] for e in events)


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1.0)


@pytest.mark.slow
def test_streaming_job_writes_dead_letters_and_commits_while_it_runs(kafka_config, topic_names, tmp_path):
    """Unbounded run: outputs and offset commits must not wait for the end of the job, which never comes."""
    schema = _schema("sensor_event.avsc")
    events = outside_events(devices=4, per_device=50)
    bad = malformed_messages(10, schema)
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    messages = [(e["device_id"].encode(), _avro(schema, e), e["event_time"]) for e in events]
    messages += [(f"bad{i}".encode(), value, None) for i, value in enumerate(bad)]  # last in their partitions
    produce_all(kafka_config, topic_names("in"), messages)
    consumer = make_consumer(kafka_config)
    ends = {tp.partition: end for tp, end in end_offsets(consumer, partitions_of(consumer, topic_names("in"))).items()}
    consumer.close()

    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bootstrap_servers", kafka_config.bootstrap_servers,
         "--input_topic", topic_names("in"), "--score_topic", topic_names("scores"),
         "--dead_letter_topic", topic_names("dead"), "--drift_topic", topic_names("drift"),
         "--consumer_group", topic_names("group")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: len(read_all(kafka_config, topic_names("scores"))) == len(events), 120, "every score")
        _wait_for(lambda: len(read_all(kafka_config, topic_names("dead"))) == len(bad), 60, "every dead letter")
        _wait_for(lambda: committed_offsets(kafka_config, topic_names("in"), topic_names("group")) == ends, 60,
                  f"offsets {ends} committed")
        assert job.poll() is None, (tmp_path / "job.log").read_text()
    finally:
        job.send_signal(signal.SIGINT)
        job.wait(timeout=30)
        log.close()
