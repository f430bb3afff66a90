"""Shared fixtures: one real broker per test session, fresh topics per test."""

from __future__ import annotations

import itertools
import logging

import pytest

from beam_jobs.embedded_broker import EmbeddedBroker
from transforms.kafka_client import KafkaConfig

_topic_counter = itertools.count()


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as running:
        yield running
    # Clients still connected when the broker stops log connection errors.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


@pytest.fixture
def kafka_config(broker) -> KafkaConfig:
    return KafkaConfig(broker.bootstrap_servers)


@pytest.fixture
def topic_names(request):
    """Topic names no other test uses: the broker lives for the whole session."""
    n = next(_topic_counter)
    stem = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]

    def name(kind: str) -> str:
        return f"{stem}-{n}-{kind}"

    return name
