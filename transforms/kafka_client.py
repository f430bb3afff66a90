"""A thin layer over kafka-python: one connection config, topic set-up, offsets.

Everything that talks to Kafka builds its clients here, so connection and
security settings are passed the same way to every client.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Optional

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, TopicAuthorizationFailedError
from kafka.structs import OffsetAndMetadata

from transforms.kafka_security import (  # noqa: F401  (re-exported: the tools import them from here)
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    KafkaAuthenticationFailed,
    KafkaNotAuthorized,
    KafkaSecurity,
    KafkaSecurityError,
    explain_denials,
    login_refused,
    not_authorized,
    principal,
    refused_logins,
    secret_from_env,
)

_LOG = logging.getLogger(__name__)

START_FROM_CHOICES = ("committed", "earliest", "latest")


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the configured bootstrap servers."""


class UnknownPartitions(ValueError):
    """A partition was asked for that the topic does not have."""


@dataclass(frozen=True)
class KafkaConfig:
    """Connection settings shared by every client the job creates."""

    bootstrap_servers: str = "localhost:9092"
    client_id: str = "sensor-scoring"
    extra: dict = field(default_factory=dict)
    security: KafkaSecurity = KafkaSecurity()

    def client_kwargs(self) -> dict:
        return {"bootstrap_servers": self.bootstrap_servers.split(","), "client_id": self.client_id,
                **self.security.client_kwargs(), **self.extra}


class PartitionDescriptor(NamedTuple):
    """One partition to read, from `start_offset` up to `stop_offset` (None: forever)."""

    topic: str
    partition: int
    start_offset: int
    stop_offset: Optional[int]


_FIRST_RETRY_S = 0.5
_SASL_ATTEMPTS = 3
_MAX_RETRY_S = 5.0


def _built(client_class: type, config: KafkaConfig, **kwargs):
    """A kafka-python client; KafkaAuthenticationFailed if it could not bootstrap because the broker refused its login.

    The broker's refusal and its closing of the connection race: a client sees
    one or the other, so one attempt may only see connections closed. With
    SASL, a client that could not bootstrap and saw no refusal tries again,
    up to three times in all, before its error stands.
    """
    attempts = _SASL_ATTEMPTS if config.security.uses_sasl else 1
    with refused_logins() as refused:
        for attempt in range(1, attempts + 1):
            try:
                return client_class(**config.client_kwargs(), **kwargs)
            except (KafkaError, OSError):
                if refused.reason:  # a wrong password stays wrong: no retries
                    raise login_refused(config.bootstrap_servers, config.security, refused.reason) from None
                if attempt == attempts:
                    raise


def _admin_attempt(config: KafkaConfig, bootstrap_s: float) -> KafkaAdminClient:
    return _built(KafkaAdminClient, config, request_timeout_ms=10000, bootstrap_timeout_ms=int(bootstrap_s * 1000))


def make_admin(config: KafkaConfig, timeout_s: float = 10.0) -> KafkaAdminClient:
    """An admin client, once the broker answers.

    A broker that is restarting or not up yet is waited for: attempts are
    retried with exponential backoff (0.5 s doubling to 5 s), each retry
    logged with the error, for up to `timeout_s`; then BrokerUnavailable with
    the address in the message.
    """
    deadline = time.monotonic() + timeout_s
    delay = _FIRST_RETRY_S
    while True:
        attempt_s = min(_MAX_RETRY_S, max(1.0, deadline - time.monotonic()))
        try:
            return _admin_attempt(config, attempt_s)
        except (KafkaError, OSError) as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {config.bootstrap_servers} within {timeout_s:.0f} s ({e!r}); "
                    "start one (./run_local.sh starts an embedded broker) or pass --bootstrap_servers"
                ) from e
            delay = min(delay, left)
            _LOG.warning("no Kafka broker answered at %s (%r); retrying in %.1f s, giving up in %.0f s",
                         config.bootstrap_servers, e, delay, left)
            time.sleep(delay)
            delay = min(2 * delay, _MAX_RETRY_S)


def _check_login(config: KafkaConfig) -> None:
    """With SASL, one quick login first, so a wrong password usually fails in seconds with the reason.

    Without it a consumer or producer spends its whole bootstrap timeout (30 s)
    retrying the refused login before it reports it. It costs one
    more connection per client (a job makes a handful, at start). Any other
    failure is left to the client itself, which waits for a broker as before.
    """
    if not config.security.uses_sasl:
        return
    try:
        _admin_attempt(config, _MAX_RETRY_S).close()
    except (KafkaError, OSError):
        pass


def make_consumer(config: KafkaConfig, group_id: str | None = None, **kwargs) -> KafkaConsumer:
    """A consumer for manual assignment; it never joins a group rebalance."""
    _check_login(config)
    return _built(KafkaConsumer, config, group_id=group_id, enable_auto_commit=False, **kwargs)


def make_producer(config: KafkaConfig, **kwargs) -> KafkaProducer:
    """A producer that waits for every in-sync replica to acknowledge each record, retrying until it does.

    Idempotent, with retries bounded by time (2 min) rather than by count, as
    Kafka's own producer and kafka-python 3 default to: a batch re-sent after
    a lost acknowledgement is not written twice, and a slow failover does not
    run out of retries. Both this and the old setting (10 retries, not
    idempotent) kept the job running with no duplicate scores when a
    partition leader was killed (tests/test_replication.py, with 3 s and 9 s
    fencing), so this is the safer default, not a measured fix.
    """
    defaults = {"acks": "all", "enable_idempotence": True, "retries": float("inf"), "delivery_timeout_ms": 120_000,
                "linger_ms": 5, "batch_size": 256 * 1024}
    _check_login(config)
    return _built(KafkaProducer, config, **{**defaults, **kwargs})


def ensure_topics(config: KafkaConfig, topics: Iterable[str], partitions: int = 4, timeout_s: float = 10.0) -> None:
    """Creates the topics that do not exist yet, replicated as the broker's ``default.replication.factor`` says.

    Existing ones are left alone. Replication factor 1, as before, would have
    left every topic the job creates on a production cluster without replicas.
    """
    admin = make_admin(config, timeout_s)
    try:
        missing = sorted(set(topics) - set(admin.list_topics()))  # topics it may not describe are missing too
        if missing:
            try:
                with explain_denials(config.bootstrap_servers, config.security, f"create or describe topic(s) {', '.join(missing)}"):
                    admin.create_topics([NewTopic(t, partitions, -1) for t in missing])
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
    """The topic's partitions, once the broker reports them; a topic the client may not describe is an error at once."""
    deadline = time.monotonic() + timeout_s
    asked_for_topic = False
    while True:
        try:
            parts = consumer.partitions_for_topic(topic)
        except KafkaError as e:  # kafka-python asks a node it knew, even a dead one, and raises its connection error
            if not e.retriable or time.monotonic() >= deadline:
                raise
            parts = None
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if not asked_for_topic:
            asked_for_topic = True
            _check_topic_described(consumer, topic)
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(f"topic {topic!r} has no partitions at {consumer.config['bootstrap_servers']}")
        time.sleep(0.2)


def _check_topic_described(consumer: KafkaConsumer, topic: str) -> None:
    """Asks the broker about this one topic with the consumer's settings; KafkaNotAuthorized if it refuses.

    A consumer asks for every topic's metadata, and the broker silently leaves
    out the ones this principal may not describe: without this question a
    missing right looks like a missing topic.
    """
    settings = {key: value for key, value in consumer.config.items() if key in KafkaAdminClient.DEFAULT_CONFIG}
    admin = KafkaAdminClient(**settings)
    try:
        (described,) = admin.describe_topics([topic])
    finally:
        admin.close()
    if described["error_code"] == TopicAuthorizationFailedError.errno:
        c = consumer.config
        who = principal(c["security_protocol"], c["sasl_mechanism"], c["sasl_plain_username"])
        raise not_authorized(who, f"describe topic {topic!r}", ",".join(c["bootstrap_servers"]),
                             TopicAuthorizationFailedError.__name__)


def read_topic(config: KafkaConfig, topic: str) -> Iterator[ConsumerRecord]:
    """Every record of `topic` from the beginning up to the end offsets it has now (tools, tests, benchmarks)."""
    consumer = make_consumer(config)
    try:
        parts = partitions_of(consumer, topic)
        ends = end_offsets(consumer, parts)
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            for records in consumer.poll(timeout_ms=500, max_records=20000).values():
                yield from records
    finally:
        consumer.close()


def commit_end_offsets(config: KafkaConfig, topic: str, group_id: str) -> None:
    """Commits `topic`'s current end offsets for `group_id`: a reader from committed offsets starts at this moment."""
    consumer = make_consumer(config, group_id=group_id)
    try:
        ends = end_offsets(consumer, partitions_of(consumer, topic))
        with explain_denials(config.bootstrap_servers, config.security, f"commit offsets of topic {topic!r} for consumer group {group_id!r}"):
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in ends.items()})
    finally:
        consumer.close()


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
                with explain_denials(config.bootstrap_servers, config.security, f"read the offsets of consumer group {group_id!r}"):
                    committed = consumer.committed(tp)
                start = earliest[tp] if committed is None else min(max(committed, earliest[tp]), latest[tp])
            descriptors.append(PartitionDescriptor(topic, tp.partition, start, latest[tp] if bounded else None))
        return descriptors
    finally:
        consumer.close()


def select_partitions(partitions: list[PartitionDescriptor], wanted: Optional[str]) -> list[PartitionDescriptor]:
    """The partitions named in `wanted` ("0,2"), or all of them when it is empty; an unknown one is an error."""
    if not wanted:
        return partitions
    try:
        numbers = {int(n) for n in wanted.split(",") if n.strip()}
    except ValueError:
        raise UnknownPartitions(f"--input_partitions {wanted}: give partition numbers, e.g. 0,2") from None
    unknown = numbers - {p.partition for p in partitions}
    if unknown:
        raise UnknownPartitions(f"--input_partitions {wanted}: the input topic has no partition "
                                f"{', '.join(map(str, sorted(unknown)))} (it has {len(partitions)})")
    return [p for p in partitions if p.partition in numbers]
