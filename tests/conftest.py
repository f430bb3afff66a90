"""Shared fixtures: real brokers for the session, fresh topics per test.

Two brokers: Tansu (``broker``, starts in 0.1 s, no Java) for the tests that
only need the Kafka protocol, and Apache Kafka itself (``kafka_broker``, a
KRaft node that takes about 7 s to start) for what depends on the broker's
behaviour: delivery under faults, TLS and SASL, the end-to-end job and the
record/replay round trip. A test module asks for Apache Kafka with
``pytestmark = pytest.mark.apache_kafka``; its ``kafka_config`` then points
there.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterator

import pytest

from beam_jobs.embedded_broker import EmbeddedBroker
from beam_jobs.kafka_cluster import KafkaCluster
from transforms.kafka_client import KafkaConfig

_topic_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "apache_kafka: runs on Apache Kafka (the kafka_broker fixture), not Tansu")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running
    # Clients still connected when the broker stops log connection errors.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One Apache Kafka node for the session; its logs stay in pytest's temporary folder."""
    with KafkaCluster(folder=tmp_path_factory.mktemp("kafka")) as running:
        yield running
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


@pytest.fixture
def kafka_config(request: pytest.FixtureRequest) -> KafkaConfig:
    """PLAINTEXT to the session's Apache Kafka in modules marked apache_kafka, to Tansu elsewhere."""
    if request.node.get_closest_marker("apache_kafka"):
        return request.getfixturevalue("kafka_broker").config()
    return KafkaConfig(request.getfixturevalue("broker").bootstrap_servers)


@pytest.fixture
def topic_names(request: pytest.FixtureRequest):
    """Topic names no other test uses: the broker lives for the whole session."""
    n = next(_topic_counter)
    stem = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]

    def name(kind: str) -> str:
        return f"{stem}-{n}-{kind}"

    return name
