"""Done-when of issue 4: the whole job, against the real broker, flags a 3-std shift and nothing else.

The stream is the simulated line the bundled model (and its drift reference)
was trained on, taken after the training period, so "unshifted" means the
same machines in normal operation. From a known window on, one reading is
moved by 3 times its fleet-wide reference std. ``__score__`` is not part of
the unshifted check: right after a job start devices warm up and score below
the training reference (KS flags the first windows; see transforms/drift.py).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from beam_jobs import sensor_scoring
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from models.artifact import BUNDLED_MODEL_DIR
from models.drift_reference import SCORE_FEATURE, load_reference
from schemas.serde import DRIFT, EVENT, RETRAIN, AvroDecoder, AvroEncoder
from tests.kafka_helpers import produce_all, read_all
from tests.test_job import ROOT, _wait_for
from transforms.kafka_client import ensure_topics

START_MS = 1_700_000_040_000  # a multiple of 60 s, so event-time windows start with the stream
DEVICES, SEED, TRAINING_STEPS = 20, 7, 1500  # models/bundle.py's simulated line
WINDOWS, SHIFT_FROM_WINDOW = 6, 3
SHIFTED = "pressure"
READINGS = ("current", "flow", "pressure", "temperature", "vibration", "voltage")


def line_events(shift: float) -> list[dict]:
    """WINDOWS minutes of the line after its training period; SHIFTED moves by `shift` std from SHIFT_FROM_WINDOW."""
    config = SimulatorConfig(devices=DEVICES, seed=SEED, fault_rate_per_hour=0.0, start_ms=START_MS)
    first = TRAINING_STEPS * DEVICES
    events = [e for e, _ in itertools.islice(LineSimulator(config).events(), first, first + WINDOWS * 60 * DEVICES)]
    delta = shift * load_reference(BUNDLED_MODEL_DIR).features[SHIFTED].std
    shift_from_ms = events[0]["event_time"] + SHIFT_FROM_WINDOW * 60_000
    for e in events:
        if e["event_time"] >= shift_from_ms and e["readings"][SHIFTED] is not None:
            e["readings"][SHIFTED] += delta
    return events


def produce_events(kafka_config, names, events: list[dict]) -> None:
    """Sends `events` to the input topic (4 partitions, keyed by device, stamped with event times)."""
    ensure_topics(kafka_config, [names("in")], partitions=4)
    encode = AvroEncoder(EVENT)
    produce_all(kafka_config, names("in"), [(e["device_id"].encode(), encode(e), e["event_time"]) for e in events])


def job_arguments(kafka_config, names) -> list[str]:
    """One test's broker, topics and group: the bounded and the streaming runs differ only in --bounded."""
    return ["--bootstrap_servers", kafka_config.bootstrap_servers, "--start_from", "earliest",
            "--input_topic", names("in"), "--score_topic", names("scores"), "--dead_letter_topic", names("dead"),
            "--drift_topic", names("drift"), "--retrain_topic", names("retrain"), "--consumer_group", names("group")]


def drift_outputs(kafka_config, names, first_ms: int) -> tuple[dict, list[dict]]:
    """Statistics by (window index, feature), checked to be one per feature and window, and the retrain triggers."""
    records = [r[3] for r in read_all(kafka_config, names("drift"), AvroDecoder(DRIFT))]
    counts = Counter(((r["window_start"] - first_ms) // 60_000, r["feature"]) for r in records)
    assert set(counts.values()) == {1}, "one record per feature per window"
    statistics = {((r["window_start"] - first_ms) // 60_000, r["feature"]): r for r in records}
    return statistics, [r[3] for r in read_all(kafka_config, names("retrain"), AvroDecoder(RETRAIN))]


def run_job_on(kafka_config, names, events: list[dict]) -> tuple[dict, list[dict]]:
    """drift_outputs of a bounded run over `events`."""
    produce_events(kafka_config, names, events)
    sensor_scoring.run(["--bounded", *job_arguments(kafka_config, names)])
    return drift_outputs(kafka_config, names, events[0]["event_time"])


@pytest.mark.slow
def test_a_three_std_shift_drifts_that_reading_only_and_only_after_the_shift(kafka_config, topic_names):
    statistics, triggers = run_job_on(kafka_config, topic_names, line_events(shift=3.0))
    assert sorted(statistics) == sorted((w, f) for w in range(WINDOWS) for f in (*READINGS, SCORE_FEATURE))
    for (window, feature), record in statistics.items():
        assert record["count"] == 60 * DEVICES
        if feature in READINGS:
            assert record["drift"] == (feature == SHIFTED and window >= SHIFT_FROM_WINDOW), record
    [trigger] = triggers
    assert trigger["feature"] == SHIFTED and trigger["consecutive_windows"] == 3
    assert trigger["first_window_start"] == statistics[SHIFT_FROM_WINDOW, SHIFTED]["window_start"]


@pytest.mark.slow
def test_the_same_stream_unshifted_has_no_drift(kafka_config, topic_names):
    statistics, triggers = run_job_on(kafka_config, topic_names, line_events(shift=0.0))
    assert len(statistics) == WINDOWS * (len(READINGS) + 1)
    drifted = [(w, f) for (w, f), r in statistics.items() if r["drift"] and f != SCORE_FEATURE]
    assert drifted == [] and triggers == []


@pytest.mark.slow
def test_a_streaming_job_emits_each_window_and_the_trigger_while_it_runs(kafka_config, topic_names, tmp_path):
    """Unbounded run: every window the data has passed closes live; the last one waits for later data.

    The events arrive as a live line sends them, 30 s of event time at a
    time, each once the last is scored: a window closes on evidence from a
    later read than the one that showed it (transforms/drift.py).
    """
    events = line_events(shift=3.0)
    ensure_topics(kafka_config, [topic_names("in")], partitions=4)
    closed = [(w, f) for w in range(WINDOWS - 1) for f in (*READINGS, SCORE_FEATURE)]
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "beam_jobs.sensor_scoring", *job_arguments(kafka_config, topic_names),
             "--retrain_after_windows", "2"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
        try:
            chunk = 30 * DEVICES
            for sent in range(chunk, len(events) + 1, chunk):
                produce_events(kafka_config, topic_names, events[sent - chunk:sent])
                _wait_for(lambda: len(read_all(kafka_config, topic_names("scores"))) >= sent, 120,
                          f"the first {sent} scores")
            _wait_for(lambda: len(read_all(kafka_config, topic_names("drift"))) >= len(closed), 300,
                      "the closed windows' statistics")
            _wait_for(lambda: read_all(kafka_config, topic_names("retrain")), 30, "the retrain trigger")
            statistics, triggers = drift_outputs(kafka_config, topic_names, events[0]["event_time"])
            assert job.poll() is None, (tmp_path / "job.log").read_text()
        finally:
            job.send_signal(signal.SIGINT)
            job.wait(timeout=60)
    assert sorted(statistics) == sorted(closed)
    for (window, feature), record in statistics.items():
        assert record["count"] == 60 * DEVICES, record
        if feature in READINGS:
            assert record["drift"] == (feature == SHIFTED and window >= SHIFT_FROM_WINDOW), record
    [trigger] = triggers
    assert trigger["feature"] == SHIFTED and trigger["consecutive_windows"] == 2
