"""Decodes and validates SensorEvent messages; everything else becomes a dead letter.

The job never stops on bad input and never drops a valid event: each input
record leaves this stage exactly once, as a ValidEvent keyed by its device or
as a Rejected dead letter (keyed by its partition) that carries the original
bytes and a readable reason. Both go down one keyed stream: see
transforms/dead_letters.py for why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

from schemas.serde import EVENT, AvroDecoder, SerdeError
from transforms.dead_letters import Rejected, dead_letter
from transforms.kafka_source import KafkaRecord
from transforms.offset_commits import SourcePosition

_METRICS = "decode"
STAGE_DECODE = "decode"
STAGE_VALIDATE = "validate"
_EARLIEST_MS = 946_684_800_000  # 2000-01-01: older timestamps are clock or unit errors


class ValidEvent(NamedTuple):
    """A decoded, validated event and where it came from."""

    event_id: str
    device_id: str
    event_time: int
    readings: dict
    source: SourcePosition
    watermark_ms: int
    key: Optional[bytes]
    value: bytes


@dataclass(frozen=True)
class ValidationRules:
    """Limits beyond which a reading or event is taken to be corrupt, not anomalous."""

    max_abs_reading: float = 1e9
    max_future_s: float = 3600.0
    max_id_length: int = 256
    max_readings: int = 1000


def validation_error(event: dict, rules: ValidationRules, now_ms: int) -> Optional[str]:
    """Why the event cannot be scored, or None if it can."""
    if not event["device_id"] or not event["device_id"].strip():
        return "missing device_id"
    if len(event["device_id"]) > rules.max_id_length:
        return f"device_id is {len(event['device_id'])} characters long (limit {rules.max_id_length})"
    if not event["event_id"] or not event["event_id"].strip():
        return "missing event_id"
    if len(event["event_id"]) > rules.max_id_length:
        return f"event_id is {len(event['event_id'])} characters long (limit {rules.max_id_length})"
    if event["event_time"] < _EARLIEST_MS:
        return f"event_time {event['event_time']} is before 2000-01-01"
    if event["event_time"] > now_ms + rules.max_future_s * 1000:
        return f"event_time {event['event_time']} is more than {rules.max_future_s:.0f} s in the future"
    if len(event["readings"]) > rules.max_readings:
        return f"{len(event['readings'])} readings (limit {rules.max_readings})"
    for name, value in event["readings"].items():
        if value is None:
            continue
        if not math.isfinite(value):
            return f"reading {name!r} is {value}"
        if abs(value) > rules.max_abs_reading:
            return f"reading {name!r} = {value:g} is beyond ±{rules.max_abs_reading:g}"
    return None


class _DecodeFn(beam.DoFn):
    def __init__(self, wire_format: str, rules: ValidationRules):
        self._wire_format = wire_format
        self._rules = rules
        self._valid = beam.metrics.Metrics.counter(_METRICS, "events_valid")
        self._dead = beam.metrics.Metrics.counter(_METRICS, "dead_letters")

    def setup(self) -> None:
        self._decode = AvroDecoder(EVENT, self._wire_format)

    def process(self, record: KafkaRecord) -> Iterator[Union[beam.window.TimestampedValue, tuple[str, Rejected]]]:
        source = SourcePosition(record.topic, record.partition, record.offset, record.span_start)
        try:
            event = self._decode(record.value)
        except SerdeError as e:
            yield self._reject(record, source, str(e), STAGE_DECODE)
            return
        error = validation_error(event, self._rules, int(time.time() * 1000))
        if error:
            yield self._reject(record, source, error, STAGE_VALIDATE)
            return
        self._valid.inc()
        valid = ValidEvent(event["event_id"], event["device_id"], event["event_time"], event["readings"],
                           source, record.watermark_ms, record.key, record.value)
        yield beam.window.TimestampedValue((valid.device_id, valid), Timestamp.of(valid.event_time / 1000))

    def _reject(self, record: KafkaRecord, source: SourcePosition, error: str, stage: str) -> tuple[str, Rejected]:
        self._dead.inc()
        beam.metrics.Metrics.counter(_METRICS, f"dead_letters_{stage}").inc()
        rejected = dead_letter(source, record.key, record.value, error, stage)
        return rejected.routing_key, rejected


class DecodeEvents(beam.PTransform):
    """KafkaRecords in; (key, ValidEvent timestamped by event_time | Rejected) out."""

    def __init__(self, wire_format: str = "plain", rules: ValidationRules = ValidationRules()):
        super().__init__()
        self._wire_format = wire_format
        self._rules = rules

    def expand(self, records: beam.PCollection[KafkaRecord]) -> beam.PCollection[tuple[str, Any]]:
        return records | "DecodeValidate" >> beam.ParDo(_DecodeFn(self._wire_format, self._rules)).with_output_types(
            Tuple[str, Any]
        )


def is_valid(element: tuple[str, Any]) -> bool:
    """For branches that only want the valid events of DecodeEvents' output."""
    return isinstance(element[1], ValidEvent)
