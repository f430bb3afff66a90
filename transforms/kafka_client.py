"""A thin layer over kafka-python: one connection config, topic set-up, offsets.

Everything that talks to Kafka builds its clients here, so connection and
security settings are passed the same way to every client.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

_LOG = logging.getLogger(__name__)

START_FROM_CHOICES = ("committed", "earliest", "latest")


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the configured bootstrap servers."""


@dataclass(frozen=True)
class KafkaConfig:
    """Connection settings shared by every client the job creates."""

    bootstrap_servers: str = "localhost:9092"
    client_id: str = "sensor-scoring"
    extra: dict = field(default_factory=dict)

    def client_kwargs(self) -> dict:
        return {"bootstrap_servers": self.bootstrap_servers.split(","), "client_id": self.client_id, **self.extra}


class PartitionDescriptor(NamedTuple):
    """One partition to read, from `start_offset` up to `stop_offset` (None: forever)."""

    topic: str
    partition: int
    start_offset: int
    stop_offset: Optional[int]


def make_admin(config: KafkaConfig, timeout_s: float = 10.0) -> KafkaAdminClient:
    """An admin client, or BrokerUnavailable with the address in the message."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(
                **config.client_kwargs(), request_timeout_ms=10000, bootstrap_timeout_ms=int(timeout_s * 1000)
            )
        except (KafkaError, OSError) as e:
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {config.bootstrap_servers} within {timeout_s:.0f} s ({e}); "
                    "start one (./run_local.sh starts an embedded broker) or pass --bootstrap_servers"
                ) from e
            time.sleep(0.5)


def make_consumer(config: KafkaConfig, group_id: str | None = None, **kwargs) -> KafkaConsumer:
    """A consumer for manual assignment; it never joins a group rebalance."""
    return KafkaConsumer(**config.client_kwargs(), group_id=group_id, enable_auto_commit=False, **kwargs)


def make_producer(config: KafkaConfig, **kwargs) -> KafkaProducer:
    """A producer that waits for every in-sync replica to acknowledge each record."""
    defaults = {"acks": "all", "enable_idempotence": False, "linger_ms": 5, "batch_size": 256 * 1024, "retries": 10}
    return KafkaProducer(**config.client_kwargs(), **{**defaults, **kwargs})


def ensure_topics(config: KafkaConfig, topics: Iterable[str], partitions: int = 4, timeout_s: float = 10.0) -> None:
    """Creates the topics that do not exist yet; existing ones are left alone."""
    admin = make_admin(config, timeout_s)
    try:
        missing = sorted(set(topics) - set(admin.list_topics()))
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass
            _LOG.info("created topics %s with %d partitions", missing, partitions)
    finally:
        admin.close()


def end_offsets(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition.

    ListOffsets is checked against the high watermark of a real fetch: some
    Kafka-protocol brokers (Tansu) answer ListOffsets with the base offset of
    the last record batch, which would make a bounded read stop short.
    """
    reported = consumer.end_offsets(partitions)
    beginning = consumer.beginning_offsets(partitions)
    result = {}
    for tp in partitions:
        result[tp] = reported[tp]
        if reported[tp] <= beginning[tp]:
            continue
        consumer.assign([tp])
        consumer.seek(tp, reported[tp] - 1)
        for _ in range(20):
            consumer.poll(timeout_ms=250, max_records=1)
            if consumer.highwater(tp) is not None:
                result[tp] = max(reported[tp], consumer.highwater(tp))
                break
    consumer.assign([])
    return result


def partitions_of(consumer: KafkaConsumer, topic: str, timeout_s: float = 10.0) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(f"topic {topic!r} has no partitions at {consumer.config['bootstrap_servers']}")
        time.sleep(0.2)


def resolve_partitions(
    config: KafkaConfig, topic: str, start_from: str, group_id: str, bounded: bool
) -> list[PartitionDescriptor]:
    """Where to start (and, if bounded, stop) reading each partition of `topic`.

    Resolved once, when the job is launched, so the offsets it commits can be
    checked for contiguity from a known start.
    """
    if start_from not in START_FROM_CHOICES:
        raise ValueError(f"start_from must be one of {START_FROM_CHOICES}, not {start_from!r}")
    consumer = make_consumer(config, group_id=group_id)
    try:
        tps = partitions_of(consumer, topic)
        earliest = consumer.beginning_offsets(tps)
        latest = end_offsets(consumer, tps)
        descriptors = []
        for tp in tps:
            start = earliest[tp]
            if start_from == "latest":
                start = latest[tp]
            elif start_from == "committed":
                committed = consumer.committed(tp)
                start = earliest[tp] if committed is None else min(max(committed, earliest[tp]), latest[tp])
            descriptors.append(PartitionDescriptor(topic, tp.partition, start, latest[tp] if bounded else None))
        return descriptors
    finally:
        consumer.close()
