"""Prints a topic's records decoded, one JSON line each, and follows it like tail -f.

    python -m beam_jobs.inspect --bootstrap_servers HOST:PORT [--topic sensor-scores] [--from-beginning]
                                [--schema sensors.DriftStatistics] [--wire_format confluent] [--max_records N]
                                [Kafka security flags, as the job's]

The schema is chosen by topic name (sensor-events, sensor-scores,
sensor-dead-letters, sensor-drift, sensor-retrain) unless --schema names it.
Without --from-beginning it starts at the end and shows only new records.
Records that do not decode are printed as {"undecodable": reason}.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Callable, Iterator, Optional

from beam_jobs.security_options import add_kafka_security_arguments, kafka_security
from schemas.serde import DEAD_LETTER, DRIFT, EVENT, RETRAIN, SCORE, WIRE_FORMATS, AvroDecoder, SerdeError
from transforms.kafka_client import KafkaConfig, KafkaSecurityError, make_consumer, partitions_of

SCHEMA_BY_TOPIC = {"sensor-events": EVENT, "sensor-scores": SCORE, "sensor-dead-letters": DEAD_LETTER,
                   "sensor-drift": DRIFT, "sensor-retrain": RETRAIN}


def _json_default(value):
    return base64.b64encode(value).decode() if isinstance(value, bytes) else str(value)


def json_line(payload: bytes, decode: Callable[[bytes], dict]) -> str:
    """One record as a JSON line; bytes fields (a dead letter's value) as base64."""
    try:
        record = decode(payload)
    except SerdeError as e:
        record = {"undecodable": str(e)}
    return json.dumps(record, default=_json_default, sort_keys=True)


def follow(config: KafkaConfig, topic: str, from_beginning: bool, max_records: Optional[int]) -> Iterator[bytes]:
    """Message values of every partition of `topic`, as they arrive, until `max_records` (None: forever)."""
    consumer = make_consumer(config)
    try:
        parts = partitions_of(consumer, topic)
        consumer.assign(parts)
        (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)(*parts)
        seen = 0
        while max_records is None or seen < max_records:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records[: None if max_records is None else max_records - seen]:
                    seen += 1
                    yield record.value
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap_servers", default="localhost:9092", help="Kafka HOST:PORT (default localhost:9092)")
    parser.add_argument("--topic", default="sensor-scores", help="topic to follow (default sensor-scores)")
    parser.add_argument("--schema", choices=sorted(SCHEMA_BY_TOPIC.values()), default=None,
                        help="record schema; needed when the topic name is not one of the defaults")
    parser.add_argument("--from-beginning", dest="from_beginning", action="store_true",
                        help="print the topic's existing records first")
    parser.add_argument("--wire_format", choices=WIRE_FORMATS, default="plain", help="as the job's (default plain)")
    parser.add_argument("--max_records", type=int, default=None, help="stop after this many (default: follow forever)")
    add_kafka_security_arguments(parser)
    args = parser.parse_args(argv)
    schema = args.schema or SCHEMA_BY_TOPIC.get(args.topic)
    if schema is None:
        parser.error(f"no default schema for topic {args.topic!r}: pass --schema")
    decode = AvroDecoder(schema, args.wire_format)
    try:
        config = KafkaConfig(args.bootstrap_servers, security=kafka_security(args))
        for payload in follow(config, args.topic, args.from_beginning, args.max_records):
            print(json_line(payload, decode), flush=True)
    except KafkaSecurityError as e:
        print(f"inspect failed: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # piped into head
        sys.stderr.close()


if __name__ == "__main__":
    main()
