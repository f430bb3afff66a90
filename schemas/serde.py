"""Avro encoding and decoding of the job's records, plain or Confluent-framed.

Every public callable raises :class:`SerdeError` with a readable message, so
callers turn bad bytes into dead letters instead of crashing.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import fastavro

SCHEMA_DIR = Path(__file__).resolve().parent
EVENT = "sensors.SensorEvent"
SCORE = "sensors.SensorScore"
DEAD_LETTER = "sensors.DeadLetter"
DRIFT = "sensors.DriftStatistics"
RETRAIN = "sensors.RetrainTrigger"
AUDIT = "sensors.AuditRecord"
DRIFT_PARTIAL = "sensors.DriftPartial"
WIRE_FORMATS = ("plain", "confluent")

_CONFLUENT_MAGIC = 0
_CONFLUENT_HEADER = struct.Struct(">BI")
_DOUBLE = struct.Struct("<d")


class SerdeError(ValueError):
    """Bytes or a record that do not fit the schema; the message says why."""


def _without_logical_types(schema: Any) -> Any:
    """Drops logicalType so timestamps decode as int millis, not datetimes.

    The job works in epoch millis throughout; fastavro's datetime conversion
    would cost a round trip per record.
    """
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    return schema


def read_schema_file(path: Path) -> dict:
    """Reads one .avsc file as a JSON dict."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class _Entry:
    name: str
    raw: dict
    parsed: Any
    parsed_for_writing: Any


class SchemaRegistry:
    """The schema ids of ``schemas/registry.json``: a file-backed registry.

    It answers which id the job writes a record with and which writer schemas
    it can resolve when reading, for the Confluent framing and for evolution.
    """

    def __init__(self, path: Path = SCHEMA_DIR / "registry.json"):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        self._entries: dict[int, _Entry] = {}
        for item in spec["schemas"]:
            raw = read_schema_file(path.parent / item["file"])
            name = f'{raw["namespace"]}.{raw["name"]}'
            parsed = fastavro.parse_schema(_without_logical_types(raw))
            self._entries[int(item["id"])] = _Entry(name, raw, parsed, fastavro.parse_schema(raw))
        self._writer = {name: int(i) for name, i in spec["writer"].items()}
        self._readable = {name: [int(i) for i in ids] for name, ids in spec.get("readable", {}).items()}

    def writer_id(self, name: str) -> int:
        return self._writer[name]

    def writing_schema(self, schema_id: int) -> Any:
        """With logical types: records may hold datetimes or epoch millis."""
        return self._entries[schema_id].parsed_for_writing

    def schema(self, schema_id: int) -> Any:
        """Without logical types: timestamps read as epoch millis."""
        try:
            return self._entries[schema_id].parsed
        except KeyError:
            raise SerdeError(f"unknown schema id {schema_id}") from None

    def raw_schema(self, schema_id: int) -> dict:
        """The schema as written in its .avsc file, logical types included."""
        return copy.deepcopy(self._entries[schema_id].raw)

    def readable_ids(self, name: str) -> list[int]:
        """Writer schema ids to try for `name`, the current one first."""
        return self._readable.get(name, [self._writer[name]])


@functools.lru_cache(maxsize=None)
def default_registry() -> SchemaRegistry:
    return SchemaRegistry()


def current_schema(name: str) -> dict:
    """A copy of the current schema of a record, as in its .avsc file."""
    registry = default_registry()
    return registry.raw_schema(registry.writer_id(name))


def _read_exact(payload: bytes, writer: Any, reader: Any) -> dict:
    buf = io.BytesIO(payload)
    try:
        record = fastavro.schemaless_reader(buf, writer, reader)
    except Exception as e:  # fastavro raises many types on garbage input
        raise SerdeError(f"not a valid Avro record: {type(e).__name__}: {e}") from None
    if buf.tell() != len(payload):
        raise SerdeError(f"{len(payload) - buf.tell()} trailing bytes after the Avro record")
    return record


class AvroDecoder:
    """Turns message bytes into a record dict of the current schema.

    Plain Avro has no schema id, so each readable writer schema is tried in
    turn, newest first, and the first that consumes every byte wins: a record
    from an older or newer compatible producer is resolved, not rejected.
    """

    def __init__(self, name: str, wire_format: str = "plain"):
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"wire_format must be one of {WIRE_FORMATS}, not {wire_format!r}")
        self._registry = default_registry()
        self._name = name
        self._reader = self._registry.schema(self._registry.writer_id(name))
        self._candidates = self._registry.readable_ids(name)
        self._decode: Callable[[bytes], dict] = (
            self._decode_confluent if wire_format == "confluent" else self._decode_plain
        )

    def __call__(self, payload: bytes) -> dict:
        if not payload:
            raise SerdeError("empty message")
        return self._decode(payload)

    def __reduce__(self):
        # Parsed fastavro schemas do not pickle well; rebuild on the worker.
        wire = "confluent" if self._decode == self._decode_confluent else "plain"
        return (AvroDecoder, (self._name, wire))

    def _resolve(self, payload: bytes, schema_id: int) -> dict:
        writer = self._registry.schema(schema_id)
        reader = None if writer is self._reader else self._reader
        return _read_exact(payload, writer, reader)

    def _decode_plain(self, payload: bytes) -> dict:
        errors = []
        for schema_id in self._candidates:
            try:
                return self._resolve(payload, schema_id)
            except SerdeError as e:
                errors.append(str(e))
        raise SerdeError(f"not a {self._name} record under any known schema version: {errors[0]}")

    def _decode_confluent(self, payload: bytes) -> dict:
        if len(payload) < _CONFLUENT_HEADER.size:
            raise SerdeError(f"message of {len(payload)} bytes is too short for the Confluent header")
        magic, schema_id = _CONFLUENT_HEADER.unpack_from(payload)
        if magic != _CONFLUENT_MAGIC:
            raise SerdeError(f"Confluent magic byte is {magic}, expected 0")
        if schema_id not in self._candidates:
            raise SerdeError(f"schema id {schema_id} is not a readable {self._name} schema")
        return self._resolve(payload[_CONFLUENT_HEADER.size :], schema_id)


class AvroEncoder:
    """Turns a record dict into message bytes with the current schema."""

    def __init__(self, name: str, wire_format: str = "plain"):
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"wire_format must be one of {WIRE_FORMATS}, not {wire_format!r}")
        self._name = name
        self._wire_format = wire_format
        registry = default_registry()
        schema_id = registry.writer_id(name)
        self._schema = registry.writing_schema(schema_id)
        self._header = _CONFLUENT_HEADER.pack(_CONFLUENT_MAGIC, schema_id) if wire_format == "confluent" else b""

    def __call__(self, record: dict) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self._schema, record)
        except Exception as e:
            raise SerdeError(f"cannot encode {self._name}: {type(e).__name__}: {e}") from None
        return buf.getvalue()

    def __reduce__(self):
        return (AvroEncoder, (self._name, self._wire_format))



SCORE_HEAD = (("event_id", "string"), ("device_id", "string"), ("event_time", "long"), ("score", "double"))
EVENT_HEAD = SCORE_HEAD[:3]


def _head(schema: dict, length: int) -> tuple:
    """(name, type) of the schema's first `length` fields, logical types read as their base type."""
    return tuple((f["name"], f["type"] if isinstance(f["type"], str) else f["type"]["type"])
                 for f in schema["fields"][:length])


def _zigzag_long(payload: bytes, pos: int) -> tuple[int, int]:
    """An Avro long at `pos` and the position after it."""
    shift = raw = 0
    while True:
        byte = payload[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7


class ScoreHeadReader:
    """device_id and score of SensorScore messages the job encoded itself, without decoding the rest.

    The drift branch needs only these two fields of every score; reading the
    first four fields of the current schema (event_id, device_id, event_time,
    score) costs about a fifth of a full decode. It refuses to start if the
    schema no longer begins with those fields, and it is only for bytes
    written by :class:`AvroEncoder` with the current schema, never for input
    from outside.
    """

    def __init__(self, wire_format: str = "plain"):
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"wire_format must be one of {WIRE_FORMATS}, not {wire_format!r}")
        head = _head(current_schema(SCORE), len(SCORE_HEAD))
        if head != SCORE_HEAD:
            raise ValueError(f"{SCORE} no longer starts with {SCORE_HEAD}: {head}")
        self._wire_format = wire_format
        self._start = _CONFLUENT_HEADER.size if wire_format == "confluent" else 0

    def __call__(self, payload: bytes) -> tuple[str, float]:
        length, pos = _zigzag_long(payload, self._start)  # event_id
        length, pos = _zigzag_long(payload, pos + length)  # device_id
        device_id = payload[pos : pos + length].decode("utf-8")
        _, pos = _zigzag_long(payload, pos + length)  # event_time
        return device_id, _DOUBLE.unpack_from(payload, pos)[0]

    def event_id(self, payload: bytes) -> str:
        """The first field alone (benchmarks following the score topic)."""
        length, pos = _zigzag_long(payload, self._start)
        return payload[pos : pos + length].decode("utf-8")

    def __reduce__(self):
        return (ScoreHeadReader, (self._wire_format,))


class EventTimeReader:
    """The ``event_time`` of SensorEvent bytes from outside, without decoding the rest; None if unreadable.

    The Kafka source reads it for every record to keep its watermark in event
    time (transforms/event_time.py), ahead of the full decode and validation.
    Every readable version of SensorEvent begins with event_id, device_id and
    event_time, so their bytes lie in the same place whichever producer wrote
    them; it refuses to start if a readable version no longer does. Garbage
    gives None (the decode step turns it into a dead letter), never an error.
    """

    def __init__(self, wire_format: str = "plain"):
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"wire_format must be one of {WIRE_FORMATS}, not {wire_format!r}")
        registry = default_registry()
        for schema_id in registry.readable_ids(EVENT):
            head = _head(registry.raw_schema(schema_id), len(EVENT_HEAD))
            if head != EVENT_HEAD:
                raise ValueError(f"{EVENT} schema {schema_id} no longer starts with {EVENT_HEAD}: {head}")
        self._wire_format = wire_format
        self._start = _CONFLUENT_HEADER.size if wire_format == "confluent" else 0

    def __call__(self, payload: bytes) -> Optional[int]:
        try:
            pos = self._start
            for _ in range(2):  # event_id, device_id: a length, then the bytes
                length, pos = _zigzag_long(payload, pos)
                if length < 0:
                    return None
                pos += length
            event_time, end = _zigzag_long(payload, pos)
        except IndexError:  # bytes end inside a field
            return None
        return event_time if end <= len(payload) else None

    def __reduce__(self):
        return (EventTimeReader, (self._wire_format,))
