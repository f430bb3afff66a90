"""Writes the job's messages to Kafka and reports which input records they cover.

One sink writes every output stream (scores, dead letters, shadow scores), each to its own
topic: the acknowledgements of all outputs must meet in one offset-commit
step, and joining two sinks' outputs would need a Flatten, which the
in-process runner holds back until the end of a streaming job.

The producer is flushed at the end of every bundle, and only then are the
source positions of the bundle's messages emitted as acknowledgements: an
offset is never committed before its output is on the broker. A send that
fails fails the bundle, which the runner retries (at-least-once).
"""

from __future__ import annotations

from typing import Iterator, List, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.kafka_client import KafkaConfig, make_producer
from transforms.live_stats import LIVE
from transforms.offset_commits import SourcePosition, Span, compact_spans

_METRICS = "kafka_sink"

SCORES = "scores"
DEAD_LETTERS = "dead_letters"
SHADOW_SCORES = "shadow_scores"
STREAMS = (SCORES, DEAD_LETTERS, SHADOW_SCORES)


class OutgoingMessage(NamedTuple):
    """One output record; `stream` picks its topic.

    `source` is the input record the message answers for; messages that
    answer for no single record (drift statistics) have None and
    acknowledge nothing. `timestamp_ms` is the event time the message is
    about, `watermark_ms` the event-time watermark its input record was read
    with (scores only: drift judges their lateness by it).
    """

    stream: str
    key: Optional[bytes]
    value: bytes
    timestamp_ms: int
    source: Optional[SourcePosition]
    watermark_ms: Optional[int] = None


class _ProduceFn(beam.DoFn):
    def __init__(self, config: KafkaConfig, topics: Mapping[str, str]):
        self._config = config
        self._topics = dict(topics)
        self._written = {stream: beam.metrics.Metrics.counter(_METRICS, f"{stream}_written") for stream in topics}
        self._latency = beam.metrics.Metrics.distribution(_METRICS, "end_to_end_latency_ms")  # source read -> acked

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
        topic = self._topics[message.stream]
        future = self._producer.send(topic, key=message.key, value=message.value, timestamp_ms=message.timestamp_ms)
        self._pending.append((message.stream, future, message.source))
        if message.source is not None:
            self._positions.append(message.source)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if not self._pending:
            return
        self._producer.flush()
        sources_by_stream: dict[str, list[Optional[SourcePosition]]] = {}
        for stream, future, source in self._pending:
            future.get(timeout=0)  # raises the send's error: the bundle is retried
            sources_by_stream.setdefault(stream, []).append(source)
        for stream, sources in sources_by_stream.items():
            self._written[stream].inc(len(sources))
            for latency in LIVE.written(stream, sources):
                self._latency.update(latency)
        for key, spans in compact_spans(self._positions).items():
            yield WindowedValue((key, spans), self._earliest, [GlobalWindow()])


class WriteToKafka(beam.PTransform):
    """Produces OutgoingMessages to ``topics[message.stream]``; outputs (partition key, acknowledged spans)."""

    def __init__(self, config: KafkaConfig, topics: Mapping[str, str]):
        super().__init__()
        self._config = config
        self._topics = topics

    def expand(self, messages: beam.PCollection[OutgoingMessage]) -> beam.PCollection[tuple[str, list[Span]]]:
        return messages | "Produce" >> beam.ParDo(_ProduceFn(self._config, self._topics)).with_output_types(
            Tuple[str, List[Tuple[int, int]]]
        )
