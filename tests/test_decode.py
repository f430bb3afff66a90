"""Tests of transforms.decode: every record leaves as a ValidEvent or as a dead letter.

Pipelines run on Beam's FnApiRunner with real Avro bytes in KafkaRecords.
"""

from __future__ import annotations

import math
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from schemas.serde import EVENT, AvroEncoder
from transforms.dead_letters import Rejected
from transforms.decode import (
    MAX_BUFFERED_EVENTS,
    STAGE_DECODE,
    STAGE_VALIDATE,
    DecodeEvents,
    DeviceEvents,
    ValidationRules,
    ValidEvent,
    validation_error,
)
from transforms.kafka_source import KafkaRecord
from transforms.offset_commits import SourcePosition

TOPIC = "sensor-events"
NOW_MS = int(time.time() * 1000)
RULES = ValidationRules()


def _event(**changes) -> dict:
    event = {"event_id": "e-1", "device_id": "press-1", "event_time": NOW_MS - 60_000,
             "readings": {"temp": 20.5, "rpm": 1500.0}}
    return {**event, **changes}


def _record(offset: int, value: bytes, key: bytes | None = b"press-1") -> KafkaRecord:
    return KafkaRecord(TOPIC, 3, offset, offset - 1, key, value, NOW_MS, None, NOW_MS - 5_000)


# (event changes, what the dead letter's error must say)
INVALID = [
    ({"device_id": ""}, "missing device_id"),
    ({"device_id": "   "}, "missing device_id"),
    ({"device_id": "d" * 257}, "device_id is 257 characters long (limit 256)"),
    ({"event_id": ""}, "missing event_id"),
    ({"event_id": "e" * 300}, "event_id is 300 characters long (limit 256)"),
    ({"event_time": 946_684_799_999}, "event_time 946684799999 is before 2000-01-01"),
    ({"event_time": 0}, "is before 2000-01-01"),
    ({"event_time": NOW_MS + 2 * 3600_000}, "is more than 3600 s in the future"),
    ({"readings": {f"r{i}": 1.0 for i in range(1001)}}, "1001 readings (limit 1000)"),
    ({"readings": {"temp": math.nan}}, "reading 'temp' is nan"),
    ({"readings": {"temp": math.inf}}, "reading 'temp' is inf"),
    ({"readings": {"rpm": -math.inf}}, "reading 'rpm' is -inf"),
    ({"readings": {"temp": 2e9}}, "reading 'temp' = 2e+09 is beyond ±1e+09"),
    ({"readings": {"temp": -1e10}}, "reading 'temp' = -1e+10 is beyond ±1e+09"),
]


@pytest.mark.parametrize("changes, message", INVALID, ids=[m for _, m in INVALID])
def test_validation_error_names_the_problem(changes, message):
    error = validation_error(_event(**changes), RULES, NOW_MS)
    assert error is not None and message in error


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"readings": {}},
        {"readings": {"temp": None, "rpm": None}},
        {"readings": {"temp": 1e9, "rpm": -1e9}},
        {"event_time": 946_684_800_000},
        {"event_time": NOW_MS + 3600_000},
        {"device_id": "d" * 256, "event_id": "e" * 256},
        {"readings": {f"r{i}": 0.0 for i in range(1000)}},
    ],
    ids=["plain", "no-readings", "null-readings", "at-limits", "first-ms-of-2000", "an-hour-ahead", "longest-ids",
         "most-readings"],
)
def test_valid_events_have_no_validation_error(changes):
    assert validation_error(_event(**changes), RULES, NOW_MS) is None


def test_validation_rules_are_configurable():
    rules = ValidationRules(max_abs_reading=10.0, max_future_s=0.0, max_id_length=4, max_readings=1)
    assert "beyond ±10" in validation_error(_event(device_id="abc", event_id="e", readings={"t": 11.0}), rules, NOW_MS)
    assert "limit 4" in validation_error(_event(device_id="abcde"), rules, NOW_MS)
    assert "2 readings (limit 1)" in validation_error(_event(device_id="abc", event_id="e"), rules, NOW_MS)
    assert "0 s in the future" in validation_error(
        _event(device_id="abc", event_id="e", readings={}, event_time=NOW_MS + 1), rules, NOW_MS)


def _expect_dead_letters(expected: list[tuple[SourcePosition, dict, str]]):
    """A matcher: the dead letters are `expected` (error checked by substring, failed_at by range)."""

    def check(actual):
        got = sorted(actual, key=lambda pair: pair[0].offset)
        want = sorted(expected, key=lambda triple: triple[0].offset)
        if len(got) != len(want):
            raise BeamAssertException(f"{len(got)} dead letters, expected {len(want)}: {got}")
        for (source, letter), (want_source, want_letter, message) in zip(got, want):
            fields = {k: v for k, v in letter.items() if k not in ("error", "failed_at")}
            if source != want_source or fields != want_letter:
                raise BeamAssertException(f"dead letter {source}, {fields} != {want_source}, {want_letter}")
            if message not in letter["error"]:
                raise BeamAssertException(f"error {letter['error']!r} does not say {message!r}")
            if not NOW_MS - 1000 <= letter["failed_at"] <= int(time.time() * 1000) + 1000:
                raise BeamAssertException(f"failed_at {letter['failed_at']} is not the time of failure")

    return check


def _polls(records: list[KafkaRecord], size: int = 4) -> list[tuple[KafkaRecord, ...]]:
    """The records as the source hands them on: a tuple per poll."""
    return [tuple(records[i:i + size]) for i in range(0, len(records), size)]


def _letter(record: KafkaRecord, stage: str) -> dict:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset, "key": record.key,
            "value": record.value, "stage": stage}


def _source(record: KafkaRecord) -> SourcePosition:
    return SourcePosition(record.topic, record.partition, record.offset, record.span_start)


def _valid(record: KafkaRecord, event: dict) -> ValidEvent:
    return ValidEvent(event["event_id"], event["device_id"], event["event_time"], event["readings"],
                      _source(record), record.watermark_ms, record.key, record.value)


def _split(outputs) -> tuple[beam.PCollection, beam.PCollection]:
    """(valid events, rejected records) of DecodeEvents' outputs, checking the keys on the way.

    `outputs` is the keyed stream with the ``dead_letters`` output, or, with
    rejected_inline (the in-process runner's streaming path), one keyed stream.
    """
    if isinstance(outputs, beam.pvalue.DoOutputsTuple):
        keyed, dead_letters = outputs
        events, _ = _split(keyed)
        return events, dead_letters

    def items_of(element):
        key, item = element
        items = item.events if isinstance(item, DeviceEvents) else (item,)
        for single in items:
            expected = single.device_id if isinstance(single, ValidEvent) else single.routing_key
            if key != expected:
                raise BeamAssertException(f"{single} keyed by {key!r}, not {expected!r}")
        return items

    items = outputs | "Items" >> beam.FlatMap(items_of)
    events = items | "Events" >> beam.Filter(lambda item: isinstance(item, ValidEvent))
    rejected = items | "Rejected" >> beam.Filter(lambda item: isinstance(item, Rejected))
    return events, rejected


def _device_events(outputs) -> beam.PCollection:
    """(device_id, [event_id, ...], timestamp ms) of each DeviceEvents element."""
    keyed = outputs["events"] if isinstance(outputs, beam.pvalue.DoOutputsTuple) else outputs
    return (keyed
            | "DeviceEvents" >> beam.Filter(lambda element: isinstance(element[1], DeviceEvents))
            | "Ids" >> beam.Map(lambda element, ts=beam.DoFn.TimestampParam:
                                (element[0], [e.event_id for e in element[1].events], ts.micros // 1000)))


@pytest.mark.parametrize("wire, inline", [("plain", False), ("confluent", False), ("plain", True)])
def test_decode_events_splits_valid_events_from_dead_letters(wire, inline):
    encode = AvroEncoder(EVENT, wire)
    good = [
        _event(),
        _event(event_id="e-2", device_id="press-2", readings={"temp": None, "rpm": None}),
        _event(event_id="e-3", readings={}, event_time=NOW_MS - 3_600_000),
    ]
    good_records = [_record(10 + i, encode(e), key=None if i == 1 else b"k") for i, e in enumerate(good)]
    invalid_records = [(_record(100 + i, encode(_event(**changes))), message)
                       for i, (changes, message) in enumerate(INVALID)]
    garbage = [
        (_record(200, b""), "empty message"),
        (_record(201, b"\x01\x02\x03\x04\x05\x06"), ""),
        (_record(202, encode(_event())[:-4]), ""),
        (_record(203, AvroEncoder(EVENT, "plain" if wire == "confluent" else "confluent")(_event())), ""),
    ]
    records = good_records + [r for r, _ in invalid_records] + [r for r, _ in garbage]
    expected_letters = ([(_source(r), _letter(r, STAGE_VALIDATE), m) for r, m in invalid_records]
                        + [(_source(r), _letter(r, STAGE_DECODE), m) for r, m in garbage])

    with BeamTestPipeline(runner="FnApiRunner") as p:
        outputs = p | beam.Create(_polls(records)) | DecodeEvents(wire, rejected_inline=inline)
        events, rejected = _split(outputs)
        assert_that(events, equal_to([_valid(r, e) for r, e in zip(good_records, good)]), label="events")
        # press-1's two events are one element, stamped with the earlier event time (e-3's).
        assert_that(_device_events(outputs),
                    equal_to([("press-1", ["e-1", "e-3"], good[2]["event_time"]),
                              ("press-2", ["e-2"], good[1]["event_time"])]), label="device events")
        assert_that(rejected, _expect_dead_letters(expected_letters), label="dead letters")


def test_each_record_leaves_exactly_once():
    encode = AvroEncoder(EVENT)
    records = [_record(i, encode(_event(event_id=f"e-{i}", readings={"temp": float(i if i % 3 else 2e9)})))
               for i in range(1, 61)]
    with BeamTestPipeline(runner="FnApiRunner") as p:
        outputs = p | beam.Create(_polls(records)) | DecodeEvents()
        events, rejected = _split(outputs)
        offsets = ((events | "EventOffsets" >> beam.Map(lambda e: e.source.offset),
                    rejected | "LetterOffsets" >> beam.Map(lambda letter: letter.source.offset))
                   | "AllOffsets" >> beam.Flatten())
        assert_that(offsets, equal_to(list(range(1, 61))), label="all offsets once")
        letters = rejected | "Offsets" >> beam.Map(lambda letter: letter.record["offset"])
        assert_that(letters, equal_to(list(range(3, 61, 3))), label="every third is out of range")


def test_a_device_s_events_are_grouped_in_arrival_order_up_to_the_buffer_limit():
    encode = AvroEncoder(EVENT)
    count = MAX_BUFFERED_EVENTS + 5
    records = [_record(i, encode(_event(event_id=f"e-{i}", device_id=f"press-{i % 2}",
                                        event_time=NOW_MS - (count - i) * 1000)))
               for i in range(count)]
    with BeamTestPipeline(runner="FnApiRunner") as p:
        groups = _device_events(p | beam.Create([tuple(records)]) | DecodeEvents())
        in_order = groups | beam.Map(lambda g: (g[0], len(g[1]), g[1] == sorted(g[1], key=lambda i: int(i[2:]))))
        half = MAX_BUFFERED_EVENTS // 2
        assert_that(in_order, equal_to([("press-0", half, True), ("press-1", half, True),
                                     ("press-0", 3, True), ("press-1", 2, True)]))


def test_custom_rules_reach_the_workers():
    encode = AvroEncoder(EVENT)
    record = _record(1, encode(_event(readings={"temp": 50.0})))
    with BeamTestPipeline(runner="FnApiRunner") as p:
        outputs = p | beam.Create([(record,)]) | DecodeEvents(rules=ValidationRules(max_abs_reading=10.0))
        events, rejected = _split(outputs)
        assert_that(events, equal_to([]), label="events")
        assert_that(rejected,
                    _expect_dead_letters([(_source(record), _letter(record, STAGE_VALIDATE), "beyond ±10")]),
                    label="dead letters")
