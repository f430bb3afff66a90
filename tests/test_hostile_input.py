"""Hostile and broken input: every record is scored or dead-lettered with a reason, and nothing crashes.

Property tests drive the decode stage's DoFn directly with Hypothesis-made
bytes (random, truncated Avro, records of other schemas, NaN/inf, huge maps,
empty and enormous ids, control characters, timestamps far in the past and
future); the end-to-end test sends a fixed-size Hypothesis sample of them,
mixed with valid events (duplicated event ids, out-of-order times), through
the real job and broker.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from apache_beam.pvalue import TaggedOutput
from hypothesis import strategies as st

from schemas.serde import DEAD_LETTER, EVENT, SCORE, AvroDecoder, AvroEncoder, EventTimeReader
from tests.kafka_helpers import produce_all, read_all
from tests.test_job import run_job
from transforms.dead_letters import Rejected
from transforms.decode import DeviceEvents, ValidationRules, ValidEvent, _DecodeFn
from transforms.event_time import WatermarkPolicy
from transforms.kafka_client import ensure_topics
from transforms.kafka_source import KafkaRecord

NOW_MS = int(time.time() * 1000)
RULES = ValidationRules()
FEATURES = ("temperature", "vibration", "current", "pressure", "flow", "voltage")

ids = st.one_of(st.text(max_size=12), st.text(min_size=250, max_size=400), st.just(""), st.just("  "),
                st.text(alphabet=st.characters(max_codepoint=31), min_size=1, max_size=4))
times = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(NOW_MS - 10 * 365 * 86_400_000, NOW_MS),
                  st.integers(NOW_MS + 7_200_000, NOW_MS + 10 * 365 * 86_400_000))
values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
readings = st.one_of(st.dictionaries(st.sampled_from(FEATURES), values),
                     st.dictionaries(st.text(max_size=300), values, max_size=5),
                     st.integers(1001, 1200).map(lambda n: {f"r{i}": 0.0 for i in range(n)}))
events = st.fixed_dictionaries({"event_id": ids, "device_id": ids, "event_time": times, "readings": readings})
_encode_event = AvroEncoder(EVENT)
_encode_score = AvroEncoder(SCORE)
scores = st.fixed_dictionaries({
    "event_id": ids, "device_id": ids, "event_time": times, "score": st.floats(), "threshold": st.floats(),
    "is_anomaly": st.booleans(), "model_version": st.text(max_size=5), "contributions": st.just({}),
    "imputed": st.just([]), "processed_at": st.just(NOW_MS)})
hostile = st.one_of(
    st.binary(max_size=200),
    events.map(_encode_event),
    st.tuples(events.map(_encode_event), st.integers(0, 60)).map(lambda t: t[0][: max(0, len(t[0]) - 1 - t[1])]),
    scores.map(_encode_score),
    st.tuples(events.map(_encode_event), st.binary(min_size=1, max_size=8)).map(lambda t: t[0] + t[1]),
)


def _decode_fn() -> _DecodeFn:
    fn = _DecodeFn("plain", RULES, None, WatermarkPolicy())
    fn.setup()
    return fn


def decode_one(fn: _DecodeFn, value: bytes, offset: int = 7) -> object:
    """What the decode stage yields for `value` alone in a bundle: its ValidEvent or its Rejected."""
    record = KafkaRecord("in", 0, offset, offset, b"k", value, NOW_MS, NOW_MS, NOW_MS)
    fn.start_bundle()
    (output,) = [*fn.process((record,)), *fn.finish_bundle()]
    if isinstance(output, TaggedOutput):  # a Rejected, on the dead-letter output
        return output.value
    _, payload = output.value  # a WindowedValue of (device_id, DeviceEvents)
    return payload.events[0]


def scoreable(event: ValidEvent, now_ms: int) -> bool:
    """What the rest of the job relies on, stated independently of the validation code."""
    return (0 < len(event.device_id) <= 256 and event.device_id.isprintable() and event.device_id.strip() != ""
            and 0 < len(event.event_id) <= 256 and event.event_id.isprintable()
            and 946_684_800_000 <= event.event_time <= now_ms + 3_600_000 and len(event.readings) <= 1000
            and all(v is None or (math.isfinite(v) and abs(v) <= 1e9) for v in event.readings.values()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile)
def test_any_bytes_become_one_scoreable_event_or_one_dead_letter_with_a_reason(value):
    output = decode_one(_decode_fn(), value)
    if isinstance(output, ValidEvent):
        assert scoreable(output, int(time.time() * 1000)), output
    else:
        assert isinstance(output, Rejected)
        assert output.record["error"] and output.record["stage"] in ("decode", "validate")
        assert output.record["value"] == value and output.record["offset"] == 7


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile)
def test_the_sources_event_time_reader_agrees_with_decode_on_any_bytes(value):
    """The watermark's reader never raises, and gives a valid event's own event_time."""
    output = decode_one(_decode_fn(), value)
    event_time = EventTimeReader()(value)
    if isinstance(output, ValidEvent):
        assert event_time == output.event_time
    else:
        assert event_time is None or isinstance(event_time, int)


def _valid_event(i: int, device: int, step: int) -> dict:
    readings = {f: 50.0 + device + (step % 7) for f in FEATURES}
    return {"event_id": f"v{i}", "device_id": f"ok-{device}", "event_time": NOW_MS - 600_000 + step * 1000,
            "readings": readings}


@pytest.mark.slow
@settings(max_examples=2, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
@given(st.lists(hostile, min_size=150, max_size=150), st.randoms(use_true_random=False))
def test_job_survives_hostile_input_and_scores_every_valid_event(kafka_config, topic_names, bad, rng):
    valid = [_valid_event(i, i % 5, i // 5) for i in range(150)]
    valid += [dict(valid[i]) for i in range(0, 150, 10)]  # duplicated event ids
    valid += [{**valid[i], "event_id": f"late{i}", "event_time": valid[i]["event_time"] - 300_000}
              for i in range(5, 150, 15)]  # out of order
    values = [_encode_event(e) for e in valid] + bad
    rng.shuffle(values)
    names = lambda kind: f"{topic_names(kind)}-{id(bad)}"  # noqa: E731 - fresh topics per example
    ensure_topics(kafka_config, [names("in")], partitions=2)
    produce_all(kafka_config, names("in"), [(None, v, None) for v in values])

    run_job(kafka_config, names)

    fn = _decode_fn()
    expected = Counter(o.event_id for o in map(lambda v: decode_one(fn, v), values) if isinstance(o, ValidEvent))
    assert expected >= Counter(e["event_id"] for e in valid)
    assert Counter(s["event_id"] for *_, s in read_all(kafka_config, names("scores"), AvroDecoder(SCORE))) == expected
    dead = [d for *_, d in read_all(kafka_config, names("dead"), AvroDecoder(DEAD_LETTER))]
    assert len(dead) == len(values) - sum(expected.values())
    assert all(d["error"] and d["stage"] in ("decode", "validate") for d in dead)
