"""The dead-letter path: records that cannot be scored, with the reason, to their own topic.

Decode's rejected records become messages here and are flattened with the
scores before the one sink, whose acknowledgements drive the offset commits.
(Streaming on the in-process runner they ride the keyed stream instead:
transforms/in_process_runner.py.)
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, NamedTuple, Optional

import apache_beam as beam

from schemas.serde import DEAD_LETTER, AvroEncoder
from transforms.kafka_sink import DEAD_LETTERS, OutgoingMessage
from transforms.offset_commits import SourcePosition, partition_key


class Rejected(NamedTuple):
    """A DeadLetter record and the input position it answers for."""

    source: SourcePosition
    record: dict

    @property
    def routing_key(self) -> str:
        """Rejected records are keyed by their partition, so a flood of them spreads like the input."""
        return partition_key(self.source.topic, self.source.partition)


def dead_letter(source: SourcePosition, key: Optional[bytes], value: bytes, error: str, stage: str) -> Rejected:
    """The dead letter of one input record that could not be scored."""
    record = {
        "topic": source.topic,
        "partition": source.partition,
        "offset": source.offset,
        "key": key,
        "value": value,
        "error": error,
        "stage": stage,
        "failed_at": int(time.time() * 1000),
    }
    return Rejected(source, record)


def dead_letter_message(rejected: Rejected, encode: Callable[[dict], bytes]) -> OutgoingMessage:
    """The message for the dead-letter topic, keyed like the input record."""
    record = rejected.record
    return OutgoingMessage(DEAD_LETTERS, record["key"], encode(record), record["failed_at"], rejected.source)


class _DeadLetterMessagesFn(beam.DoFn):
    def __init__(self, wire_format: str):
        self._wire_format = wire_format

    def setup(self) -> None:
        self._encode = AvroEncoder(DEAD_LETTER, self._wire_format)

    def process(self, rejected: Rejected) -> Iterator[OutgoingMessage]:
        yield dead_letter_message(rejected, self._encode)


class DeadLetterMessages(beam.PTransform):
    """Rejected records in, their dead-letter topic messages out."""

    def __init__(self, wire_format: str = "plain"):
        super().__init__()
        self._wire_format = wire_format

    def expand(self, rejected: beam.PCollection[Rejected]) -> beam.PCollection[OutgoingMessage]:
        return rejected | "Encode" >> beam.ParDo(_DeadLetterMessagesFn(self._wire_format))
