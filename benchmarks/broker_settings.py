"""The client settings that depend on the broker, measured on Tansu and on Apache Kafka.

    python -m benchmarks.broker_settings [--broker tansu kafka] [--records 200]

The job's defaults were tuned on Tansu, which holds an empty fetch for its
whole ``fetch_max_wait_ms``. For each broker this starts a fresh one and
measures, with the job's own client factories (transforms/kafka_client.py):

* fetch wait: how long a record written to a caught-up partition takes to
  come out of ``poll()``, and how long the broker holds an empty fetch, for
  each ``fetch_max_wait_ms``;
* producer: a bundle's worth of sends then ``flush()`` (what the sink does at
  the end of every bundle) for each ``linger_ms`` and ``acks``;
* offset commits: the time of one synchronous commit (the commit step makes
  one per bundle that advances offsets).

Prints one JSON line per broker.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from contextlib import ExitStack

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from beam_jobs.embedded_broker import EmbeddedBroker
from beam_jobs.kafka_cluster import KafkaCluster
from transforms.kafka_client import KafkaConfig, ensure_topics, make_consumer, make_producer

TOPIC = "settings-bench"
FETCH_WAITS_MS = (10, 50, 100, 500)
LINGERS_MS = (0, 5, 20)
BUNDLE = 500  # records per sink bundle in a streaming run at 2,000 events/s (a poll's worth)


def _ms(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 1)}


def fetch_wait(config: KafkaConfig, wait_ms: int, records: int) -> dict:
    """Write-to-poll latency of single records on a caught-up partition, and how long an empty fetch is held.

    A consumer thread polls all the time, as the source does; records are
    written at random moments, so they land at any point of a held fetch.
    An empty fetch held for `h` ms means 1000/h fetches a second per
    partition while the partition is idle.
    """
    tp = TopicPartition(TOPIC, 0)
    consumer = make_consumer(config, fetch_max_wait_ms=wait_ms)
    consumer.assign([tp])
    consumer.seek_to_end(tp)
    arrived: dict[bytes, float] = {}
    stop = threading.Event()

    def follow() -> None:
        while not stop.is_set():
            for record in consumer.poll(timeout_ms=100).get(tp, []):
                arrived[record.value] = time.monotonic()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    time.sleep(1.0)
    idle_hold_ms = consumer.metrics()["consumer-fetch-manager-metrics"]["fetch-latency-avg"]
    producer = make_producer(config, linger_ms=0)
    written: dict[bytes, float] = {}
    rng = random.Random(wait_ms)
    try:
        for i in range(records):
            time.sleep(rng.uniform(0.0, 0.03))
            value = str(i).encode()
            written[value] = time.monotonic()
            producer.send(TOPIC, value, partition=0)
            producer.flush()
        deadline = time.monotonic() + 5
        while len(arrived) < records and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        follower.join()
        producer.close()
        consumer.close()
    return {"fetch_max_wait_ms": wait_ms, **_ms([arrived[v] - t for v, t in written.items() if v in arrived]),
            "received": len(arrived), "idle_fetch_held_ms": round(idle_hold_ms, 1)}


def bundles(config: KafkaConfig, linger_ms: int, acks: object, count: int) -> dict:
    """`count` bundles of BUNDLE sends of 200 bytes, each ended with flush() and its futures checked."""
    producer = make_producer(config, linger_ms=linger_ms, acks=acks, enable_idempotence=acks == "all")
    value = b"v" * 200
    times = []
    try:
        for _ in range(count):
            started = time.monotonic()
            futures = [producer.send(TOPIC, key=str(i % 50).encode(), value=value) for i in range(BUNDLE)]
            producer.flush()
            for future in futures:
                future.get(timeout=0)
            times.append(time.monotonic() - started)
    finally:
        producer.close()
    return {"linger_ms": linger_ms, "acks": acks, **_ms(times),
            "records_per_s": round(BUNDLE * count / sum(times))}


def commits(config: KafkaConfig, count: int) -> dict:
    consumer = make_consumer(config, group_id="settings-bench")
    tp = TopicPartition(TOPIC, 0)
    times = []
    try:
        for offset in range(count):
            started = time.monotonic()
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
            times.append(time.monotonic() - started)
    finally:
        consumer.close()
    return {"commits": count, **_ms(times[1:])}  # the first finds the group coordinator


def measure(name: str, records: int) -> dict:
    with ExitStack() as stack:
        started = time.monotonic()
        broker = stack.enter_context(KafkaCluster() if name == "kafka" else EmbeddedBroker())
        figures: dict = {"broker": name, "start_s": round(time.monotonic() - started, 2)}
        config = KafkaConfig(broker.bootstrap_servers)
        ensure_topics(config, [TOPIC], partitions=1)
        figures["fetch_wait"] = [fetch_wait(config, wait, records) for wait in FETCH_WAITS_MS]
        figures["producer"] = [bundles(config, linger, acks, records) for linger in LINGERS_MS for acks in ("all", 1)]
        figures["commit"] = commits(config, records)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.broker_settings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", nargs="+", choices=("tansu", "kafka"), default=["tansu", "kafka"])
    parser.add_argument("--records", type=int, default=200, help="samples per setting (default 200)")
    args = parser.parse_args(argv)
    for name in args.broker:
        print(json.dumps(measure(name, args.records)), flush=True)


if __name__ == "__main__":
    main()
