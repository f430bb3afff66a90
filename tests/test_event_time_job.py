"""Done-when of issue 16: the job's clock is the event's ``event_time``, whatever Kafka's record timestamp says.

A user produces last month's recording with kafka-python's defaults, so each
record's timestamp is its send time; another stamps event times; a third
gateway forwards buffered readings with timestamps out of order. All three
must score, expire and close drift windows exactly alike, bounded and
streaming, and alike with the same readings produced live.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaConsumer
from kafka.partitioner import murmur2

from beam_jobs import sensor_scoring
from beam_jobs.embedded_broker import free_port
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from schemas.serde import DRIFT, EVENT, SCORE, AvroDecoder, AvroEncoder
from tests.kafka_helpers import produce_all, read_all
from tests.test_job import ROOT, _wait_for
from transforms.kafka_client import ensure_topics

pytestmark = pytest.mark.apache_kafka  # the production broker: its CreateTime stamps, its empty fetches

DAY_MS = 86_400_000
PARTITIONS, DEVICES, STEPS, CHUNK_STEPS = 3, 9, 300, 60
STOP_AT_STEP = 150  # one device per partition goes silent here, for good
TTL_S, CALIBRATION, OUT_OF_ORDER_S = 60, 60, 5
START_MS = (int(time.time() * 1000) - 30 * DAY_MS) // 60_000 * 60_000  # 30 days old, on a drift window edge
DECODE_SCORE, DECODE_DRIFT, ENCODE_EVENT = AvroDecoder(SCORE), AvroDecoder(DRIFT), AvroEncoder(EVENT)


def recording(start_ms: int = START_MS) -> tuple[list[dict], set[str], set[str]]:
    """A faulty simulated fleet: events in time order, the faulty event ids, and the devices that stop halfway."""
    simulator = LineSimulator(SimulatorConfig(devices=DEVICES, seed=11, fault_rate_per_hour=6.0, start_ms=start_ms))
    by_partition: dict[int, list[str]] = {}
    for device in simulator.device_ids:
        by_partition.setdefault(_partition_of(device), []).append(device)
    stopping = {devices[0] for devices in by_partition.values() if len(devices) > 1}
    events, faulty = [], set()
    for event, is_fault in simulator.take(DEVICES * STEPS):
        step = int(event["event_id"].rsplit("-", 1)[1])
        if event["device_id"] in stopping and step >= STOP_AT_STEP:
            continue
        events.append(event)
        if is_fault:
            faulty.add(event["event_id"])
    return events, faulty, stopping


def _partition_of(device_id: str) -> int:
    """Where Kafka's default partitioner puts the device's key."""
    return (murmur2(device_id.encode()) & 0x7FFFFFFF) % PARTITIONS


def record_timestamps(events: list[dict], how: str) -> list[int | None]:
    """What a producer puts in the record timestamp: its send time, the event time, or event times shuffled."""
    if how == "send_time":
        return [None] * len(events)
    times = [e["event_time"] for e in events]
    return times if how == "event_time" else np.random.default_rng(5).permutation(times).tolist()


def produce(kafka_config, topic: str, events: list[dict], timestamps: list[int | None]) -> None:
    ensure_topics(kafka_config, [topic], partitions=PARTITIONS)
    produce_all(kafka_config, topic, [(e["device_id"].encode(), ENCODE_EVENT(e), ts)
                                      for e, ts in zip(events, timestamps)])


def job_arguments(kafka_config, names) -> list[str]:
    return ["--bootstrap_servers", kafka_config.bootstrap_servers, "--start_from", "earliest",
            "--input_topic", names("in"), "--score_topic", names("scores"), "--dead_letter_topic", names("dead"),
            "--drift_topic", names("drift"), "--retrain_topic", names("retrain"), "--consumer_group", names("group"),
            "--calibration_events", str(CALIBRATION), "--state_ttl_s", str(TTL_S),
            "--max_out_of_orderness_s", str(OUT_OF_ORDER_S)]


def scores(kafka_config, names) -> dict[str, bytes]:
    """Score bytes by event id, processed_at zeroed: the rest must be byte-identical between runs."""
    encode = AvroEncoder(SCORE)
    out = {}
    for *_, value in read_all(kafka_config, names("scores")):
        record = DECODE_SCORE(value)
        assert record["event_id"] not in out, "one score per event"
        out[record["event_id"]] = encode({**record, "processed_at": 0})
    return out


def drift_records(kafka_config, topic: str) -> dict[tuple[int, str], bytes]:
    """Drift record bytes of `topic` by (window start, feature), checked to be one each."""
    records = [value for *_, value in read_all(kafka_config, topic)]
    keys = [(DECODE_DRIFT(v)["window_start"], DECODE_DRIFT(v)["feature"]) for v in records]
    assert set(Counter(keys).values()) <= {1}, "one record per feature and window"
    return dict(zip(keys, records))


def retrain_triggers(kafka_config, topic: str) -> list[bytes]:
    """RetrainTrigger record bytes of `topic`, sorted: which partition a trigger lands in is not theirs to keep."""
    return sorted(value for *_, value in read_all(kafka_config, topic))


def bounded_run(kafka_config, names, events: list[dict], how: str) -> tuple[dict, dict]:
    produce(kafka_config, names("in"), events, record_timestamps(events, how))
    sensor_scoring.run(["--bounded", *job_arguments(kafka_config, names)])
    return scores(kafka_config, names), drift_records(kafka_config, names("drift"))


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not served")


def streaming_run(kafka_config, names, events: list[dict], how: str, log_path) -> tuple[dict, dict, float]:
    """The job unbounded, fed a minute of event time at a time; its scores, drift records and reclaimed devices."""
    timestamps = record_timestamps(events, how)
    ensure_topics(kafka_config, [names("in")], partitions=PARTITIONS)
    port = free_port()
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "beam_jobs.sensor_scoring", *job_arguments(kafka_config, names),
             "--metrics_port", str(port)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
        try:
            chunk_ms = CHUNK_STEPS * 1000
            for chunk_start in range(START_MS, START_MS + STEPS * 1000, chunk_ms):
                chunk = [i for i, e in enumerate(events) if chunk_start <= e["event_time"] < chunk_start + chunk_ms]
                produce(kafka_config, names("in"), [events[i] for i in chunk], [timestamps[i] for i in chunk])
                _wait_for(lambda: len(read_all(kafka_config, names("scores"))) >= chunk[-1] + 1, 120,
                          f"scores up to {chunk[-1] + 1}")
            _wait_for(lambda: metric(port, "sensor_scoring_devices_expired_total") >= 2, 30, "idle devices reclaimed")
            expired = metric(port, "sensor_scoring_devices_expired_total")
            assert job.poll() is None, log_path.read_text()
        finally:
            job.send_signal(signal.SIGINT)
            job.wait(timeout=60)
    return scores(kafka_config, names), drift_records(kafka_config, names("drift")), expired


_REFERENCE: dict[str, tuple] = {}


def reference(kafka_config) -> tuple:
    """The bounded run with record timestamps = event times (what the job always handled), once per broker."""
    if kafka_config.bootstrap_servers not in _REFERENCE:
        events, faulty, stopping = recording()
        names = lambda kind: f"event-time-reference-{kind}"  # noqa: E731
        _REFERENCE[kafka_config.bootstrap_servers] = (events, faulty, stopping,
                                                      bounded_run(kafka_config, names, events, "event_time"))
    return _REFERENCE[kafka_config.bootstrap_servers]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["send_time", "shuffled"])
def test_bounded_runs_ignore_record_timestamps(kafka_config, topic_names, how):
    events, _, _, (expected_scores, expected_drift) = reference(kafka_config)
    got_scores, got_drift = bounded_run(kafka_config, topic_names, events, how)
    assert len(expected_scores) == len(events) and got_scores == expected_scores
    windows = STEPS // 60
    assert len(expected_drift) == windows * 7 and got_drift == expected_drift


@pytest.mark.slow
@pytest.mark.parametrize("how", ["send_time", "shuffled"])
def test_streaming_runs_of_old_data_score_reclaim_and_close_windows_as_bounded_runs(
        kafka_config, topic_names, how, tmp_path):
    events, _, stopping, (expected_scores, expected_drift) = reference(kafka_config)
    got_scores, got_drift, expired = streaming_run(kafka_config, topic_names, events, how, tmp_path / "job.log")
    assert got_scores == expected_scores
    # Windows close on watermark evidence from a later bundle: every window before the last chunk's has closed.
    last_chunk_start = START_MS + STEPS * 1000 - CHUNK_STEPS * 1000
    closed = {key for key in got_drift if key[0] + 60_000 <= last_chunk_start - OUT_OF_ORDER_S * 1000}
    assert len(closed) == 3 * 7
    assert {key: got_drift[key] for key in got_drift} == {key: expected_drift[key] for key in got_drift}
    # The devices gone silent: reclaimed once their partition's event time passed their last event + TTL.
    assert expired >= len(stopping) >= 2


@pytest.mark.slow
def test_old_data_with_send_time_stamps_alarms_on_its_faults_as_the_same_readings_live(kafka_config, topic_names):
    """The same readings, produced now with event times of now: the same scores, so the same alarms."""
    events, faulty, _, (old_scores, _) = reference(kafka_config)
    shift = (int(time.time() * 1000) - 600_000) // 60_000 * 60_000 - START_MS
    live = [{**e, "event_time": e["event_time"] + shift} for e in events]
    live_scores, _ = bounded_run(kafka_config, topic_names, live, "event_time")

    def alarms(by_id: dict[str, bytes]) -> dict[str, tuple]:
        decoded = {i: DECODE_SCORE(v) for i, v in by_id.items()}
        return {i: (r["is_anomaly"], r["score"], r["contributions"]) for i, r in decoded.items()}

    old, now = alarms(old_scores), alarms(live_scores)
    assert old == now
    on_faults = sum(old[i][0] for i in faulty)
    assert on_faults >= 20, f"only {on_faults} alarms on {len(faulty)} faulty events"


@pytest.mark.slow
def test_a_live_stream_closes_each_drift_window_within_the_stated_bound(kafka_config, topic_names, tmp_path):
    """Readings sent as they happen (event time = now, default record timestamps), 5 s drift windows.

    Bound (README, "Observability and drift"): a window's statistics are on
    the broker within --max_out_of_orderness_s + 5 s of its end, while every
    partition keeps sending.
    """
    names, window_s, seconds = topic_names, 5, 30
    ensure_topics(kafka_config, [names("in")], partitions=PARTITIONS)
    start_ms = (int(time.time() * 1000) // (window_s * 1000) + 1) * window_s * 1000  # on a window edge
    simulator = LineSimulator(SimulatorConfig(devices=DEVICES, seed=2, fault_rate_per_hour=6.0, start_ms=start_ms))
    steps = iter(simulator.events())
    consumer = KafkaConsumer(names("drift"), **kafka_config.client_kwargs(), auto_offset_reset="earliest",
                             consumer_timeout_ms=100)
    seen_at: dict[tuple[int, str], float] = {}
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "beam_jobs.sensor_scoring", *job_arguments(kafka_config, names),
             "--drift_window_s", str(window_s)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: "reading" in (tmp_path / "job.log").read_text(), 60, "the job to start reading")
            for step in range(seconds):
                while time.time() * 1000 < start_ms + step * 1000:
                    _note_drift(consumer, seen_at)
                produce(kafka_config, names("in"), [next(steps)[0] for _ in range(DEVICES)], [None] * DEVICES)
            for _ in range(30):
                _note_drift(consumer, seen_at)
        finally:
            job.send_signal(signal.SIGINT)
            job.wait(timeout=60)
            consumer.close()
    first_full = start_ms + 2 * window_s * 1000  # the job was reading before then: no start-up in the figure
    last_closable = start_ms + seconds * 1000 - (OUT_OF_ORDER_S + window_s) * 1000
    delays = {key: at - (key[0] + window_s * 1000) / 1000 for key, at in seen_at.items()
              if first_full <= key[0] <= last_closable - window_s * 1000}
    expected = range(first_full, last_closable - window_s * 1000 + 1, window_s * 1000)
    assert sorted({start for start, _ in delays}) == list(expected)
    print(f"drift window close delays (s after the window's end): {sorted(round(d, 2) for d in delays.values())}")
    assert max(delays.values()) <= OUT_OF_ORDER_S + 5


def _note_drift(consumer: KafkaConsumer, seen_at: dict) -> None:
    """Polls the drift topic once; the wall time each (window, feature) was first seen."""
    for records in consumer.poll(timeout_ms=100).values():
        for record in records:
            stats = DECODE_DRIFT(record.value)
            seen_at.setdefault((stats["window_start"], stats["feature"]), time.time())
