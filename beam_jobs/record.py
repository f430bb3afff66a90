"""Records a Kafka topic of SensorEvents into a recording file, for replays and file-mode runs.

    python -m beam_jobs.record --bootstrap_servers HOST:PORT --topic sensor-events --output FILE.avro \\
        [--from BOUND] [--to BOUND] [--wire_format plain|confluent] [Kafka security flags, as the job's]

Reads every partition from --from (default: the earliest offset) up to, not
including, --to (default: the end offset when the tool starts), so it
finishes even while producers keep writing. A bound is one of

  1500                    the same offset in every partition
  0:1500,1:1320           offsets per partition (partitions not named: the default)
  2024-06-01T12:00:00Z    a time (ISO 8601, UTC if no zone): records whose Kafka
                          timestamp is at or after (--from) or before (--to) it

A time bound scans the whole offset range and keeps records by timestamp:
offsets-for-times lookups are not used because some Kafka-protocol brokers
(the embedded Tansu among them) answer them wrongly.

Partitions are merged by Kafka record timestamp, each kept in offset order,
so replaying the file with original timing plays the events as they arrived
and a device's events (one key, one partition) keep their order. The output
is an Avro file of SensorEvent records; FILE.avro.sources holds each event's
topic, partition, offset and Kafka timestamp. Messages that are not
SensorEvents are skipped and counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import logging
import math
import sys
import time
from collections import deque
from typing import Callable, Iterator, NamedTuple, Optional

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from beam_jobs.progress import Progress
from beam_jobs.recordings import RecordedSource, write_events
from beam_jobs.security_options import add_kafka_security_arguments, kafka_security
from schemas.serde import EVENT, WIRE_FORMATS, AvroDecoder, SerdeError
from transforms.kafka_client import (
    BrokerUnavailable,
    KafkaConfig,
    KafkaSecurityError,
    end_offsets,
    make_consumer,
    partitions_of,
)

_LOG = logging.getLogger("record")
_MAX_BUFFERED = 10_000  # per partition, while waiting for slower partitions to catch up in time
_STALL_S = 30.0  # no record for this long while records are expected: the broker lost them


class Bound(NamedTuple):
    """A --from/--to value: a time in epoch millis, or offsets (key None: every partition)."""

    time_ms: Optional[int]
    offsets: dict[Optional[int], int]


def parse_bound(text: str) -> Bound:
    """Reads an offset, per-partition offsets or an ISO 8601 time; ValueError says what is accepted."""
    text = text.strip()
    try:
        if text.isdigit():
            return Bound(None, {None: int(text)})
        if ":" in text and all(part.split(":")[0].strip().isdigit() for part in text.split(",")):
            pairs = (part.split(":") for part in text.split(","))
            return Bound(None, {int(p): int(o) for p, o in pairs})
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not an offset (1500), per-partition offsets (0:1500,1:1320) or an ISO 8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return Bound(int(when.timestamp() * 1000), {})


def _resolve(tps: list[TopicPartition], bound: Optional[Bound],
             default: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Each partition's offset for `bound`; partitions it does not name, and time bounds, get `default`."""
    if bound is None or bound.time_ms is not None:
        return dict(default)
    return {tp: bound.offsets.get(tp.partition, bound.offsets.get(None, default[tp])) for tp in tps}


def offset_ranges(consumer: KafkaConsumer, topic: str, start: Optional[Bound],
                  stop: Optional[Bound]) -> dict[TopicPartition, tuple[int, int]]:
    """[start, stop) offsets per partition, clamped to what the partition holds now."""
    tps = partitions_of(consumer, topic)
    earliest = consumer.beginning_offsets(tps)
    latest = end_offsets(consumer, tps)
    starts = _resolve(tps, start, earliest)
    stops = _resolve(tps, stop, latest)
    clamp = lambda tp, offset: min(max(offset, earliest[tp]), latest[tp])  # noqa: E731
    return {tp: (clamp(tp, starts[tp]), max(clamp(tp, stops[tp]), clamp(tp, starts[tp]))) for tp in tps}


class _PartitionBuffers:
    """Records polled but not yet merged, per partition, with back-pressure on fast partitions."""

    def __init__(self, consumer: KafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]]):
        self._consumer = consumer
        self._stops = {tp: stop for tp, (start, stop) in ranges.items() if start < stop}
        self.pending = {tp: deque() for tp in self._stops}
        consumer.assign(list(self._stops))
        for tp in self._stops:
            consumer.seek(tp, ranges[tp][0])

    def _finished(self, tp: TopicPartition) -> bool:
        return not self.pending[tp] and self._consumer.position(tp) >= self._stops[tp]

    def fill(self) -> None:
        """Polls until every unfinished partition has a buffered record; drops finished ones."""
        last_record = time.monotonic()
        while True:
            for tp in [tp for tp in self.pending if self._finished(tp)]:
                del self.pending[tp]
                self._consumer.pause(tp)
            if all(self.pending.values()):
                return
            full = [tp for tp, records in self.pending.items() if len(records) >= _MAX_BUFFERED]
            self._consumer.pause(*full)
            batch = self._consumer.poll(timeout_ms=500)
            self._consumer.resume(*full)
            for tp, records in batch.items():
                self.pending[tp].extend(r for r in records if r.offset < self._stops[tp])
            if batch:
                last_record = time.monotonic()
            elif time.monotonic() - last_record > _STALL_S:
                waiting = [f"p{tp.partition}@{self._consumer.position(tp)}<{self._stops[tp]}"
                           for tp in self.pending if not self.pending[tp]]
                raise RuntimeError(f"no records for {_STALL_S:.0f} s from partitions {', '.join(waiting)}")


def merged_records(consumer: KafkaConsumer,
                   ranges: dict[TopicPartition, tuple[int, int]]) -> Iterator[ConsumerRecord]:
    """The records of the ranges, merged across partitions by timestamp, offset order kept in each."""
    buffers = _PartitionBuffers(consumer, ranges)
    buffers.fill()
    while buffers.pending:
        tp = min(buffers.pending, key=lambda p: (buffers.pending[p][0].timestamp, p.partition))
        yield buffers.pending[tp].popleft()
        if not buffers.pending[tp]:
            buffers.fill()


def _time_window(start: Optional[Bound], stop: Optional[Bound]) -> tuple[float, float]:
    """[from, to) in epoch millis of the time bounds; infinite where a bound is absent or an offset."""
    low = start.time_ms if start and start.time_ms is not None else -math.inf
    high = stop.time_ms if stop and stop.time_ms is not None else math.inf
    return low, high


def _decoded(records: Iterator[ConsumerRecord], decode: Callable[[bytes], dict], window: tuple[float, float],
             skipped: list[str], progress: Callable[[int], None]) -> Iterator[tuple[dict, RecordedSource]]:
    """(SensorEvent, where it was) for each record in the time window; undecodable ones go to `skipped`."""
    low, high = window
    for record in records:
        progress(1)
        if not low <= record.timestamp < high:
            continue
        try:
            event = decode(record.value)
        except SerdeError as e:
            skipped.append(f"p{record.partition}@{record.offset}: {e}")
            continue
        yield event, RecordedSource(record.topic, record.partition, record.offset, record.timestamp)


def record(config: KafkaConfig, topic: str, output: str, start: Optional[Bound] = None, stop: Optional[Bound] = None,
           *, wire_format: str = "plain") -> tuple[int, list[str]]:
    """Writes the topic's records in the bounds to `output`; returns (events written, skipped messages)."""
    consumer = make_consumer(config, max_partition_fetch_bytes=4 * 1024 * 1024)
    try:
        ranges = offset_ranges(consumer, topic, start, stop)
        _LOG.info("recording %s: %s", topic, ", ".join(f"p{tp.partition}@{a}..{b}" for tp, (a, b) in ranges.items()))
        skipped: list[str] = []
        total = sum(b - a for a, b in ranges.values())
        with Progress(f"record {topic}", total) as bar:
            pairs = _decoded(merged_records(consumer, ranges), AvroDecoder(EVENT, wire_format),
                             _time_window(start, stop), skipped, bar.advance)
            # write_events zips the two back together, so tee holds at most one pair.
            for_events, for_sources = itertools.tee(pairs)
            written = write_events(output, (e for e, _ in for_events), sources=(s for _, s in for_sources))
        return written, skipped
    finally:
        consumer.close()


def _bound_arg(text: str) -> Bound:
    """parse_bound for argparse, which shows the message only of an ArgumentTypeError."""
    try:
        return parse_bound(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap_servers", default="localhost:9092",
                        help="Kafka bootstrap servers, comma-separated (default localhost:9092)")
    parser.add_argument("--topic", default="sensor-events", help="SensorEvent topic to record (default sensor-events)")
    parser.add_argument("--output", required=True, metavar="FILE.avro",
                        help="recording to write; FILE.avro.sources gets the Kafka positions")
    parser.add_argument("--from", dest="start", type=_bound_arg, metavar="BOUND",
                        help="first offset(s) or earliest time to record (default: the earliest offset)")
    parser.add_argument("--to", dest="stop", type=_bound_arg, metavar="BOUND",
                        help="offset(s) or time to stop before (default: the end offset at start-up)")
    parser.add_argument("--wire_format", choices=WIRE_FORMATS, default="plain",
                        help="plain schemaless Avro (default) or confluent framing, as the producers write")
    add_kafka_security_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    try:
        config = KafkaConfig(args.bootstrap_servers, security=kafka_security(args))
        written, skipped = record(config, args.topic, args.output, args.start, args.stop, wire_format=args.wire_format)
    except (BrokerUnavailable, KafkaSecurityError, RuntimeError, OSError) as e:
        print(f"record failed: {e}", file=sys.stderr)
        sys.exit(2)
    for reason in skipped[:5]:
        print(f"skipped {reason}", file=sys.stderr)
    note = f"; skipped {len(skipped)} messages that are not SensorEvents" if skipped else ""
    print(f"done: wrote {written} events from {args.topic} to {args.output}{note}", file=sys.stderr)


if __name__ == "__main__":
    main()
