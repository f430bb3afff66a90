"""Replays recordings into a Kafka topic, as fast as possible or with the original timing.

    python -m beam_jobs.replay --input FILE.avro [FILE.avro ...] --bootstrap_servers HOST:PORT \\
        --topic sensor-events [--speed S] [--shift_to_now] [--wire_format plain|confluent] \\
        [Kafka security flags, as the job's]

Events of all files are merged by event time; each file keeps its own order,
so a device's events are sent in recorded order. Messages are keyed by
device_id (one device, one partition, so per-device order holds) and their
Kafka timestamp is the event time, for other consumers: the job itself reads
event time from the payload, whatever the record timestamp says.

--speed 0 sends as fast as the broker takes them; 1 keeps the recorded gaps
between event times; 10 plays ten times faster. An event whose time is
before an earlier one's is sent at once, never held back.
--shift_to_now moves every event time by one offset so the first event is
"now"; without it event times are replayed unchanged. The topic is created
if it does not exist.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable, Iterator, Sequence

from beam_jobs.progress import Progress
from beam_jobs.recordings import PathLike, RecordingError, count_events, merged_events
from beam_jobs.security_options import add_kafka_security_arguments, kafka_security
from schemas.serde import EVENT, WIRE_FORMATS, AvroEncoder
from transforms.kafka_client import BrokerUnavailable, KafkaConfig, KafkaSecurityError, ensure_topics, make_producer

_LOG = logging.getLogger("replay")


class _Pacer:
    """Sleeps so that event times are reached at `speed` times the wall clock; 0 never sleeps."""

    def __init__(self, speed: float):
        if speed < 0:
            raise ValueError(f"speed must be >= 0, not {speed}")
        self._speed = speed
        self._origin: tuple[int, float] | None = None
        self._latest_ms = 0

    def wait_for(self, event_time: int) -> None:
        if not self._speed:
            return
        if self._origin is None:
            self._origin = (event_time, time.monotonic())
        self._latest_ms = max(self._latest_ms, event_time)
        first_ms, started = self._origin
        ahead = started + (self._latest_ms - first_ms) / 1000 / self._speed - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def _shifted(events: Iterator[dict], shift_to_now: bool) -> Iterator[dict]:
    """The events, each moved by (now - first event time) when asked to."""
    offset = None
    for event in events:
        if shift_to_now:
            if offset is None:
                offset = int(time.time() * 1000) - event["event_time"]
            event = {**event, "event_time": event["event_time"] + offset}
        yield event


def replay(paths: Sequence[PathLike], config: KafkaConfig, topic: str, speed: float = 0.0, *,
           shift_to_now: bool = False, wire_format: str = "plain", partitions: int = 4,
           progress: Callable[[int], None] | None = None) -> int:
    """Sends the events of the recordings to `topic` and waits for every acknowledgement.

    Args:
        paths: Recordings (globs allowed), merged by event time.
        config: The broker to send to.
        topic: Created with `partitions` partitions if missing.
        speed: 0 as fast as possible, 1 original timing, 10 ten times faster.
        shift_to_now: Move event times so the first event is now.
        wire_format: plain or confluent, as the job reading the topic expects.
        partitions: Partitions of the topic if it has to be created.
        progress: Called with 1 after each event is handed to the producer.

    Returns:
        The number of events sent.

    Raises:
        RecordingError: A recording is missing or unreadable.
        RuntimeError: The broker rejected some records.
    """
    events = merged_events(paths)
    ensure_topics(config, [topic], partitions=partitions)
    encode = AvroEncoder(EVENT, wire_format)
    pacer = _Pacer(speed)
    failures: list[Exception] = []
    producer = make_producer(config)
    count = 0
    try:
        for event in _shifted(events, shift_to_now):
            pacer.wait_for(event["event_time"])
            future = producer.send(topic, key=event["device_id"].encode(), value=encode(event),
                                   timestamp_ms=event["event_time"])
            future.add_errback(failures.append)
            count += 1
            if progress:
                progress(1)
        producer.flush()
    finally:
        producer.close()
    if failures:
        raise RuntimeError(f"{len(failures)} of {count} records were not written to {topic}: {failures[0]}")
    return count


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="recordings (Avro SensorEvent files); globs are expanded too")
    parser.add_argument("--bootstrap_servers", default="localhost:9092",
                        help="Kafka bootstrap servers, comma-separated (default localhost:9092)")
    parser.add_argument("--topic", default="sensor-events", help="topic to send to (default sensor-events)")
    parser.add_argument("--speed", type=float, default=0.0,
                        help="0 as fast as possible (default), 1 original timing, 10 ten times faster")
    parser.add_argument("--shift_to_now", action="store_true",
                        help="move event times so the first event is now (default: keep recorded times)")
    parser.add_argument("--wire_format", choices=WIRE_FORMATS, default="plain",
                        help="plain schemaless Avro (default) or confluent framing")
    parser.add_argument("--topic_partitions", type=int, default=4,
                        help="partitions of the topic if it has to be created (default 4)")
    add_kafka_security_arguments(parser)
    args = parser.parse_args(argv)
    if args.speed < 0:
        parser.error("--speed must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = KafkaConfig(args.bootstrap_servers, security=kafka_security(args))
        total = count_events(args.input)
        with Progress(f"replay to {args.topic}", total) as bar:
            sent = replay(args.input, config, args.topic, args.speed,
                          shift_to_now=args.shift_to_now, wire_format=args.wire_format,
                          partitions=args.topic_partitions, progress=bar.advance)
    except (RecordingError, BrokerUnavailable, KafkaSecurityError, RuntimeError) as e:
        print(f"replay failed: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)
    print(f"done: sent {sent} events from {len(args.input)} file(s) to {args.topic}", file=sys.stderr)


if __name__ == "__main__":
    main()
