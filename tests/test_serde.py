"""Tests of schemas.serde: round trips, schema evolution, bad bytes and pickling.

Records are real Avro bytes; schemas are the project's .avsc files.
"""

from __future__ import annotations

import io
import math
import pickle
import struct

import fastavro
import pytest
from apache_beam.internal import pickler as beam_pickler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.serde import (
    DEAD_LETTER,
    EVENT,
    SCHEMA_DIR,
    SCORE,
    AvroDecoder,
    AvroEncoder,
    ScoreHeadReader,
    SerdeError,
    current_schema,
    default_registry,
    read_schema_file,
)

WIRE = pytest.mark.parametrize("wire", ["plain", "confluent"])
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(st.characters(codec="utf-8"), max_size=24)
longs = st.integers(-(2**63), 2**63 - 1)
ints = st.integers(-(2**31), 2**31 - 1)
doubles = st.floats(allow_nan=False)
events = st.fixed_dictionaries({
    "event_id": texts,
    "device_id": texts,
    "event_time": longs,
    "readings": st.dictionaries(texts, st.none() | doubles, max_size=8),
})
scores = st.fixed_dictionaries({
    "event_id": texts,
    "device_id": texts,
    "event_time": longs,
    "score": doubles,
    "threshold": doubles,
    "is_anomaly": st.booleans(),
    "model_version": texts,
    "contributions": st.dictionaries(texts, doubles, max_size=8),
    "imputed": st.lists(texts, max_size=8),
    "processed_at": longs,
})
dead_letters = st.fixed_dictionaries({
    "topic": texts,
    "partition": ints,
    "offset": longs,
    "key": st.none() | st.binary(max_size=32),
    "value": st.binary(max_size=256),
    "error": texts,
    "stage": st.sampled_from(["decode", "validate", "inference"]),
    "failed_at": longs,
})

EVENT_NOW = {"event_id": "e-1", "device_id": "press-7", "event_time": 1_700_000_000_000,
             "readings": {"temp": 21.5, "vibration": None, "rpm": -3.0}}


def _history_schema(name: str):
    return fastavro.parse_schema(read_schema_file(SCHEMA_DIR / "history" / name))


def _schemaless(schema, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def _confluent(schema_id: int, body: bytes) -> bytes:
    return struct.pack(">bI", 0, schema_id) + body


@WIRE
@pytest.mark.parametrize("name", [EVENT, SCORE, DEAD_LETTER])
@PROPERTY
@given(data=st.data())
def test_records_round_trip(wire, name, data):
    record = data.draw({EVENT: events, SCORE: scores, DEAD_LETTER: dead_letters}[name])
    assert AvroDecoder(name, wire)(AvroEncoder(name, wire)(record)) == record


@WIRE
def test_nan_and_infinite_readings_survive_the_round_trip(wire):
    event = {**EVENT_NOW, "readings": {"a": math.nan, "b": math.inf, "c": -math.inf}}
    readings = AvroDecoder(EVENT, wire)(AvroEncoder(EVENT, wire)(event))["readings"]
    assert math.isnan(readings["a"]) and readings["b"] == math.inf and readings["c"] == -math.inf


def test_confluent_framing_is_magic_byte_and_big_endian_writer_id():
    plain, framed = AvroEncoder(EVENT)(EVENT_NOW), AvroEncoder(EVENT, "confluent")(EVENT_NOW)
    writer_id = default_registry().writer_id(EVENT)
    assert framed == b"\x00" + writer_id.to_bytes(4, "big") + plain


def test_current_schema_is_the_avsc_file_and_a_copy():
    schema = current_schema(EVENT)
    assert schema == read_schema_file(SCHEMA_DIR / "sensor_event.avsc")
    schema["fields"].clear()
    assert current_schema(EVENT)["fields"]


@PROPERTY
@given(event=events.map(lambda e: {**e, "readings": {k: v for k, v in e["readings"].items() if v is not None}}))
def test_v0_records_resolve_to_the_current_shape(event):
    """v0 had non-null doubles; plain bytes carry no id, so the decoder must find v0 itself."""
    body = _schemaless(_history_schema("sensor_event_v0.avsc"), event)
    assert AvroDecoder(EVENT)(body) == event
    assert AvroDecoder(EVENT, "confluent")(_confluent(4, body)) == event


@pytest.mark.parametrize("firmware", [None, "fw-2.4.1"])
def test_v2_records_resolve_to_the_current_shape_without_the_new_field(firmware):
    body = _schemaless(_history_schema("sensor_event_v2.avsc"), {**EVENT_NOW, "firmware": firmware})
    assert AvroDecoder(EVENT)(body) == EVENT_NOW
    assert AvroDecoder(EVENT, "confluent")(_confluent(5, body)) == EVENT_NOW


def test_v2_default_fills_in_when_the_writer_omits_the_new_field():
    body = _schemaless(_history_schema("sensor_event_v2.avsc"), EVENT_NOW)  # firmware defaults to null
    assert AvroDecoder(EVENT)(body) == EVENT_NOW


@pytest.mark.parametrize(
    "wire, payload, message",
    [
        ("plain", b"", "empty message"),
        ("confluent", b"", "empty message"),
        ("plain", b"\xff" * 20, "not a sensors.SensorEvent record under any known schema version"),
        ("plain", b"\x02e", "not a valid Avro record"),
        ("confluent", b"\x00\x00\x01", "too short for the Confluent header"),
        ("confluent", b"\x01\x00\x00\x00\x01\x02e", "magic byte is 1, expected 0"),
        ("confluent", b"\x00\x00\x00\x00\x63\x02e", "schema id 99 is not a readable sensors.SensorEvent schema"),
        ("confluent", b"\x00\x00\x00\x00\x02\x02e", "schema id 2 is not a readable"),
    ],
)
def test_bad_payloads_raise_serde_error_with_a_readable_message(wire, payload, message):
    with pytest.raises(SerdeError, match=message.replace(".", r"\.")):
        AvroDecoder(EVENT, wire)(payload)


@WIRE
def test_trailing_bytes_are_rejected(wire):
    payload = AvroEncoder(EVENT, wire)(EVENT_NOW) + b"\x00\x00\x00"
    with pytest.raises(SerdeError, match="trailing bytes"):
        AvroDecoder(EVENT, wire)(payload)


@WIRE
@PROPERTY
@given(event=events, data=st.data())
def test_every_truncation_of_a_record_is_rejected(wire, event, data):
    payload = AvroEncoder(EVENT, wire)(event)
    cut = data.draw(st.integers(0, len(payload) - 1), label="cut")
    with pytest.raises(SerdeError):
        AvroDecoder(EVENT, wire)(payload[:cut])


@WIRE
@PROPERTY
@given(payload=st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_serde_error_only(wire, payload):
    try:
        record = AvroDecoder(EVENT, wire)(payload)
    except SerdeError as e:
        assert str(e)
    else:
        assert set(record) == {"event_id", "device_id", "event_time", "readings"}


def test_records_that_do_not_fit_the_schema_raise_serde_error():
    with pytest.raises(SerdeError, match="cannot encode sensors.SensorEvent"):
        AvroEncoder(EVENT)({**EVENT_NOW, "readings": {"temp": "hot"}})
    with pytest.raises(SerdeError, match="cannot encode sensors.SensorScore"):
        AvroEncoder(SCORE)({"event_id": "e"})


def test_unknown_wire_format_is_refused():
    with pytest.raises(ValueError, match="wire_format"):
        AvroDecoder(EVENT, "json")
    with pytest.raises(ValueError, match="wire_format"):
        AvroEncoder(EVENT, "json")


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), (beam_pickler.dumps, beam_pickler.loads)],
                         ids=["pickle", "beam-pickler"])
@WIRE
def test_encoders_and_decoders_survive_pickling(dumps, loads, wire):
    encode, decode = loads(dumps(AvroEncoder(EVENT, wire))), loads(dumps(AvroDecoder(EVENT, wire)))
    payload = encode(EVENT_NOW)
    assert payload == AvroEncoder(EVENT, wire)(EVENT_NOW)
    assert decode(payload) == EVENT_NOW
    other = AvroEncoder(EVENT, "plain" if wire == "confluent" else "confluent")(EVENT_NOW)
    with pytest.raises(SerdeError):
        decode(other)  # the wire format travels with the pickle


@WIRE
@PROPERTY
@given(score=scores)
def test_the_score_head_reader_gives_the_decoders_device_id_and_score(wire, score):
    device_id, value = ScoreHeadReader(wire)(AvroEncoder(SCORE, wire)(score))
    decoded = AvroDecoder(SCORE, wire)(AvroEncoder(SCORE, wire)(score))
    assert device_id == decoded["device_id"] and value == decoded["score"]
