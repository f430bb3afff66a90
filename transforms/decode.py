"""Decodes and validates SensorEvent messages; everything else becomes a dead letter.

The job never stops on bad input and never drops a valid event: each input
record leaves this stage exactly once, as a ValidEvent in its device's
:class:`DeviceEvents` or as a Rejected dead letter that carries the original
bytes and a readable reason, on the ``dead_letters`` output (streaming on the
in-process runner: down the keyed stream, keyed by partition; see
transforms/in_process_runner.py).

Valid events leave grouped by device: each device's events of a bundle (up to
``MAX_BUFFERED_EVENTS`` at a time), in arrival order, as one element. Every
step from here to the device state then runs once per device and bundle
rather than once per event: Beam's per-element work and the state read and
write were about a quarter of the job's CPU per event (docs/performance.md,
"One element per device and bundle"). The events wait for the end of their
bundle, as their scores already did for the sink's flush.

Data minimisation: a ValidEvent keeps only what scoring needs (ids, event
time, readings); other fields of newer producers' schemas are dropped by the
Avro reader. With a pseudonymizer, the device id is replaced right here, so
state keys, scores, drift and audit records only ever see the pseudonym; so is
the event id, which producers often build from the device id (the simulator
does), and which stays unique and stable, so duplicates remain recognisable. The
original key and bytes stay with the event only to be written to the
dead-letter topic should it fail; dead letters keep the original bytes by
contract, so that topic needs the same protection as the input topic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from schemas.serde import EVENT, AvroDecoder, SerdeError
from transforms.dead_letters import Rejected, dead_letter
from transforms.event_time import EARLIEST_EVENT_MS, WatermarkPolicy
from transforms.kafka_source import KafkaRecord, RecordBatch
from transforms.live_stats import LIVE
from transforms.offset_commits import SourcePosition
from transforms.pseudonymize import pseudonymizer_from_env
from transforms.windowing import stamped

_METRICS = "decode"
STAGE_DECODE = "decode"
STAGE_VALIDATE = "validate"
MAX_BUFFERED_EVENTS = 2048


class ValidEvent(NamedTuple):
    """A decoded, validated event and where it came from."""

    event_id: str
    device_id: str
    event_time: int
    readings: dict
    source: SourcePosition
    watermark_ms: Optional[int]  # its partition's event-time watermark when it was read (transforms/event_time.py)
    key: Optional[bytes]
    value: bytes


class DeviceEvents(NamedTuple):
    """One device's consecutive valid events, in arrival order: the element of the keyed stream."""

    events: tuple[ValidEvent, ...]


@dataclass(frozen=True)
class ValidationRules:
    """Limits beyond which a reading or event is taken to be corrupt, not anomalous."""

    max_abs_reading: float = 1e9
    max_future_s: float = 3600.0
    max_id_length: int = 256
    max_readings: int = 1000


def _id_error(name: str, value: str, rules: ValidationRules) -> Optional[str]:
    """Ids become state keys, Kafka keys and log text: blank, huge or control characters are corrupt."""
    if not value or not value.strip():
        return f"missing {name}"
    if len(value) > rules.max_id_length:
        return f"{name} is {len(value)} characters long (limit {rules.max_id_length})"
    if not value.isprintable():
        return f"{name} {value[:40]!r} contains control or unprintable characters"
    return None


def validation_error(event: dict, rules: ValidationRules, now_ms: int) -> Optional[str]:
    """Why the event cannot be scored, or None if it can."""
    error = _id_error("device_id", event["device_id"], rules) or _id_error("event_id", event["event_id"], rules)
    if error:
        return error
    if event["event_time"] < EARLIEST_EVENT_MS:
        return f"event_time {event['event_time']} is before 2000-01-01"
    if event["event_time"] > now_ms + rules.max_future_s * 1000:
        return f"event_time {event['event_time']} is more than {rules.max_future_s:.0f} s in the future"
    if len(event["readings"]) > rules.max_readings:
        return f"{len(event['readings'])} readings (limit {rules.max_readings})"
    for name, value in event["readings"].items():
        if len(name) > rules.max_id_length:
            return f"a reading name is {len(name)} characters long (limit {rules.max_id_length})"
        if value is None:
            continue
        if not math.isfinite(value):
            return f"reading {name!r} is {value}"
        if abs(value) > rules.max_abs_reading:
            return f"reading {name!r} = {value:g} is beyond ±{rules.max_abs_reading:g}"
    return None


DEAD_LETTERS_OUTPUT = "dead_letters"


class _DecodeFn(beam.DoFn):
    def __init__(self, wire_format: str, rules: ValidationRules, pseudonymize_key_env: Optional[str],
                 policy: WatermarkPolicy, rejected_inline: bool = False):
        self._wire_format = wire_format
        self._rules = rules
        self._pseudonymize_key_env = pseudonymize_key_env  # the variable's name; the key is read in setup()
        self._policy = policy
        self._rejected_inline = rejected_inline
        self._valid = beam.metrics.Metrics.counter(_METRICS, "events_valid")
        self._dead = beam.metrics.Metrics.counter(_METRICS, "dead_letters")
        self._late = beam.metrics.Metrics.counter(_METRICS, "late_events")

    def setup(self) -> None:
        self._decode = AvroDecoder(EVENT, self._wire_format)
        self._pseudonymize = pseudonymizer_from_env(self._pseudonymize_key_env)

    def start_bundle(self) -> None:
        self._by_device: dict[str, list[ValidEvent]] = {}
        self._buffered = 0

    def process(self, records: RecordBatch) -> Iterator[Union[WindowedValue, tuple[str, Rejected], TaggedOutput]]:
        for record in records:
            rejected = self._take(record)
            if rejected is not None:
                yield rejected
            elif self._buffered >= MAX_BUFFERED_EVENTS:
                yield from self._device_events()

    def _take(self, record: KafkaRecord) -> Optional[Union[TaggedOutput, tuple[str, Rejected]]]:
        """Buffers the record's event under its device, or returns its dead letter."""
        source = SourcePosition(record.topic, record.partition, record.offset, record.span_start)
        try:
            event = self._decode(record.value)
        except SerdeError as e:
            return self._reject(record, source, str(e), STAGE_DECODE)
        error = validation_error(event, self._rules, int(time.time() * 1000))
        if error:
            return self._reject(record, source, error, STAGE_VALIDATE)
        self._valid.inc()
        if self._policy.is_late(event["event_time"], record.watermark_ms):
            self._late.inc()
            LIVE.add("late_events")
        event_id, device_id = event["event_id"], event["device_id"]
        if self._pseudonymize:
            event_id, device_id = self._pseudonymize(event_id), self._pseudonymize(device_id)
        valid = ValidEvent(event_id, device_id, event["event_time"], event["readings"],
                           source, record.watermark_ms, record.key, record.value)
        self._by_device.setdefault(device_id, []).append(valid)
        self._buffered += 1
        return None

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield from self._device_events()

    def _device_events(self) -> Iterator[WindowedValue]:
        """Each device's buffered events, stamped with the earliest event time among them."""
        for device_id, events in self._by_device.items():
            yield stamped((device_id, DeviceEvents(tuple(events))), min(e.event_time for e in events))
        self._by_device.clear()
        self._buffered = 0

    def _reject(self, record: KafkaRecord, source: SourcePosition, error: str, stage: str
                ) -> Union[TaggedOutput, tuple[str, Rejected]]:
        self._dead.inc()
        beam.metrics.Metrics.counter(_METRICS, f"dead_letters_{stage}").inc()
        rejected = dead_letter(source, record.key, record.value, error, stage)
        if self._rejected_inline:
            return rejected.routing_key, rejected
        return TaggedOutput(DEAD_LETTERS_OUTPUT, rejected)


class DecodeEvents(beam.PTransform):
    """RecordBatches in; (device_id, DeviceEvents) out, and Rejected on the ``dead_letters`` output.

    DeviceEvents are timestamped with their earliest event time.
    `rejected_inline` (streaming on the in-process runner only) sends the
    Rejected down the keyed stream instead, as (partition, Rejected), and
    returns that one stream.

    `pseudonymize_key_env` names the environment variable with the HMAC key
    that replaces device ids (transforms/pseudonymize.py); None keeps them.
    Late events (`policy`, transforms/event_time.py) are counted here and
    scored like any other.
    """

    def __init__(self, wire_format: str = "plain", rules: ValidationRules = ValidationRules(),
                 pseudonymize_key_env: Optional[str] = None, policy: WatermarkPolicy = WatermarkPolicy(),
                 rejected_inline: bool = False):
        super().__init__()
        self._wire_format = wire_format
        self._rules = rules
        self._pseudonymize_key_env = pseudonymize_key_env
        self._policy = policy
        self._rejected_inline = rejected_inline

    def expand(self, records: beam.PCollection[RecordBatch]):
        decode = _DecodeFn(self._wire_format, self._rules, self._pseudonymize_key_env, self._policy,
                           self._rejected_inline)
        step = beam.ParDo(decode).with_output_types(Tuple[str, Any])
        if self._rejected_inline:
            return records | "DecodeValidate" >> step
        return records | "DecodeValidate" >> step.with_outputs(DEAD_LETTERS_OUTPUT, main="events")

