"""Writes messages to a Kafka topic and reports which input records they cover.

The producer is flushed at the end of every bundle, and only then are the
source positions of the bundle's messages emitted as acknowledgements: an
offset is never committed before its output is on the broker. A send that
fails fails the bundle, which the runner retries (at-least-once).
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.kafka_client import KafkaConfig, make_producer
from transforms.offset_commits import SourcePosition, Span, compact_spans

_METRICS = "kafka_sink"


class OutgoingMessage(NamedTuple):
    key: Optional[bytes]
    value: bytes
    timestamp_ms: int
    source: SourcePosition


class _ProduceFn(beam.DoFn):
    def __init__(self, config: KafkaConfig, topic: str):
        self._config = config
        self._topic = topic
        self._written = beam.metrics.Metrics.counter(_METRICS, f"{topic}_written")

    def setup(self) -> None:
        self._producer = make_producer(self._config)

    def teardown(self) -> None:
        self._producer.close(timeout=10)

    def start_bundle(self) -> None:
        self._pending: list = []
        self._positions: list[SourcePosition] = []
        self._earliest: Timestamp = MAX_TIMESTAMP

    def process(self, message: OutgoingMessage, timestamp=beam.DoFn.TimestampParam) -> None:
        self._earliest = min(self._earliest, timestamp)
        self._pending.append(
            self._producer.send(self._topic, key=message.key, value=message.value, timestamp_ms=message.timestamp_ms)
        )
        self._positions.append(message.source)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if not self._pending:
            return
        self._producer.flush()
        for future in self._pending:
            future.get(timeout=0)  # raises the send's error: the bundle is retried
        self._written.inc(len(self._pending))
        for key, spans in compact_spans(self._positions).items():
            yield WindowedValue((key, spans), self._earliest, [GlobalWindow()])


class WriteToKafka(beam.PTransform):
    """Produces OutgoingMessages to `topic`; outputs (partition key, acknowledged spans)."""

    def __init__(self, config: KafkaConfig, topic: str):
        super().__init__()
        self._config = config
        self._topic = topic

    def expand(self, messages: beam.PCollection[OutgoingMessage]) -> beam.PCollection[tuple[str, list[Span]]]:
        return messages | "Produce" >> beam.ParDo(_ProduceFn(self._config, self._topic)).with_output_types(
            Tuple[str, List[Tuple[int, int]]]
        )
