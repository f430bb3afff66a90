"""The dead-letter path: records that cannot be scored, with the reason, to their own topic."""

from __future__ import annotations

import time
from typing import Optional

import apache_beam as beam

from schemas.serde import DEAD_LETTER, AvroEncoder
from transforms.kafka_sink import OutgoingMessage
from transforms.offset_commits import SourcePosition

DEAD_LETTERS = "dead_letters"


def dead_letter(
    source: SourcePosition, key: Optional[bytes], value: bytes, error: str, stage: str
) -> tuple[SourcePosition, dict]:
    """(source position, DeadLetter record) for one rejected input record."""
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
    return source, record


class _EncodeDeadLetterFn(beam.DoFn):
    def __init__(self, wire_format: str):
        self._wire_format = wire_format

    def setup(self) -> None:
        self._encode = AvroEncoder(DEAD_LETTER, self._wire_format)

    def process(self, element: tuple[SourcePosition, dict]) -> tuple[OutgoingMessage]:
        source, record = element
        return (OutgoingMessage(record["key"], self._encode(record), record["failed_at"], source),)


class EncodeDeadLetters(beam.PTransform):
    """(position, DeadLetter) pairs to messages for the dead-letter topic, keyed like the input."""

    def __init__(self, wire_format: str = "plain"):
        super().__init__()
        self._wire_format = wire_format

    def expand(self, letters: beam.PCollection[tuple[SourcePosition, dict]]) -> beam.PCollection[OutgoingMessage]:
        return letters | "EncodeDeadLetter" >> beam.ParDo(_EncodeDeadLetterFn(self._wire_format))
