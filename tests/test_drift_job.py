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
from collections import Counter

import pytest

from beam_jobs import sensor_scoring
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from models.artifact import BUNDLED_MODEL_DIR
from models.drift_reference import SCORE_FEATURE, load_reference
from schemas.serde import DRIFT, EVENT, RETRAIN, AvroDecoder, AvroEncoder
from tests.kafka_helpers import produce_all, read_all
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


def run_job_on(kafka_config, names, events: list[dict]) -> tuple[dict, list[dict]]:
    """Statistics by (window index, feature), and the retrain triggers, of a bounded run over `events`."""
    ensure_topics(kafka_config, [names("in")], partitions=4)
    encode = AvroEncoder(EVENT)
    produce_all(kafka_config, names("in"), [(e["device_id"].encode(), encode(e), e["event_time"]) for e in events])
    sensor_scoring.run([
        "--bootstrap_servers", kafka_config.bootstrap_servers, "--bounded", "--start_from", "earliest",
        "--input_topic", names("in"), "--score_topic", names("scores"), "--dead_letter_topic", names("dead"),
        "--drift_topic", names("drift"), "--retrain_topic", names("retrain"), "--consumer_group", names("group"),
    ])
    first_ms = events[0]["event_time"]
    records = [r[3] for r in read_all(kafka_config, names("drift"), AvroDecoder(DRIFT))]
    counts = Counter(((r["window_start"] - first_ms) // 60_000, r["feature"]) for r in records)
    assert set(counts.values()) == {1}, "one record per feature per window"
    statistics = {((r["window_start"] - first_ms) // 60_000, r["feature"]): r for r in records}
    return statistics, [r[3] for r in read_all(kafka_config, names("retrain"), AvroDecoder(RETRAIN))]


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
