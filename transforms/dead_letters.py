"""The dead-letter path: records that cannot be scored, with the reason, to their own topic.

A rejected record travels down the same keyed path as the valid events, past
the device state and RunInference untouched, so that it leaves the pipeline
through the one sink whose acknowledgements drive the offset commits.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

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
