"""Reading and writing whole topics in tests, with nothing but kafka-python (and the config's security settings)."""

from __future__ import annotations

from typing import Callable

from kafka import KafkaConsumer, KafkaProducer

from transforms.kafka_client import KafkaConfig, partitions_of, read_topic


def produce_all(config: KafkaConfig, topic: str, messages: list[tuple[bytes | None, bytes, int | None]]) -> None:
    """Sends (key, value, timestamp_ms) messages and waits for every acknowledgement."""
    producer = KafkaProducer(**config.client_kwargs(), acks="all", linger_ms=5)
    futures = [producer.send(topic, key=k, value=v, timestamp_ms=ts) for k, v, ts in messages]
    producer.flush()
    for f in futures:
        f.get(timeout=10)
    producer.close()


def read_all(config: KafkaConfig, topic: str, decode: Callable[[bytes], dict] = lambda b: b) -> list[tuple]:
    """Every record of `topic` as (partition, offset, key, decoded value), in partition order."""
    out = [(r.partition, r.offset, r.key, decode(r.value)) for r in read_topic(config, topic)]
    return sorted(out, key=lambda r: (r[0], r[1]))


def committed_offsets(config: KafkaConfig, topic: str, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(**config.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        return {tp.partition: consumer.committed(tp) for tp in partitions_of(consumer, topic)}
    finally:
        consumer.close()
