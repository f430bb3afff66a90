"""A broker lost mid-stream: three Apache Kafka nodes, and the leader of input and output partitions SIGKILLed.

Topics have replication factor 3 and ``min.insync.replicas`` 2, the job's
producers wait for every in-sync replica (acks=all), so a record the broker
acknowledged survives the loss of its leader. While the streaming job scores
a steady feed, the node that leads both an input and a score partition is
killed; later it comes back and the node leading partitions then is killed
too. Every event must be scored, every offset committed, and the job must
keep running throughout; duplicate scores are counted and printed (pytest -s).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, TypeVar

import pytest

from kafka.errors import KafkaError

from beam_jobs.kafka_cluster import KafkaCluster
from tests.test_faults import all_committed, input_ends, produce_events, scored_ids, start_job, stop_gracefully
from tests.test_job import _wait_for, outside_events
from transforms.kafka_client import KafkaConfig, ensure_topics, make_admin

pytestmark = pytest.mark.slow
T = TypeVar("T")

EVENTS_PER_S = 400
FAILOVER_S = 60  # a killed leader is fenced after 3 s here (broker.session.timeout.ms), then leadership moves


def retrying(read: Callable[[], T]) -> T:
    """`read()`, asked again while a dead leader is still in the clients' metadata (a retriable error)."""
    for _ in range(30):
        try:
            return read()
        except KafkaError as e:
            if not e.retriable:
                raise
            time.sleep(1.0)
    raise AssertionError("the cluster could not be read for 30 s")


def scores_so_far(config: KafkaConfig) -> int:
    return sum(retrying(lambda: scored_ids(config)).values())


def leader_of_input_and_scores(cluster: KafkaCluster) -> int:
    """The live node that leads an input and a score partition (the most of them, if several do)."""
    inputs, scores = list(cluster.leaders("in").values()), list(cluster.leaders("scores").values())
    both = (set(inputs) & set(scores)) - {-1}
    assert both, f"no node leads both an input and a score partition: {inputs}, {scores}"
    return max(sorted(both), key=lambda node: inputs.count(node) + scores.count(node))


def fully_replicated(cluster: KafkaCluster, topics: list[str]) -> bool:
    """Every partition of the topics has all three replicas in sync."""
    admin = make_admin(cluster.config())
    try:
        return all(len(p["isr_nodes"]) == 3 for t in admin.describe_topics(topics) for p in t["partitions"])
    finally:
        admin.close()


def feed(cluster: KafkaCluster, events: list[dict], done: threading.Event, failures: list[BaseException]) -> None:
    """Writes the events at EVENTS_PER_S, a second's worth at a time, through the failovers."""
    try:
        for start in range(0, len(events), EVENTS_PER_S):
            second_started = time.monotonic()
            produce_events(cluster.config(), events[start:start + EVENTS_PER_S])
            time.sleep(max(0.0, 1.0 - (time.monotonic() - second_started)))
    except BaseException as e:  # noqa: BLE001 - reported by the test
        failures.append(e)
    finally:
        done.set()


def test_job_keeps_scoring_when_partition_leaders_are_killed(tmp_path):
    events = outside_events(devices=40, per_device=500, seed=8)  # 20,000 events, about 50 s of feed
    log = tmp_path / "job.log"
    started = time.monotonic()
    with KafkaCluster(3, folder=tmp_path / "kafka", heap_mb=384) as cluster:
        config = cluster.config()
        ensure_topics(config, ["in", "scores", "dead", "drift"], partitions=4)
        # A new topic's metadata reaches the other nodes a moment after its creation is acknowledged.
        _wait_for(lambda: len(cluster.leaders("in")) == 4 and fully_replicated(cluster, ["in", "scores"]), 30,
                  "the new topics' leaders and in-sync replicas")
        job = start_job(cluster.bootstrap_servers, log)
        fed, failures = threading.Event(), []
        feeder = threading.Thread(target=feed, args=(cluster, events, fed, failures), daemon=True)
        try:
            feeder.start()
            kills = []
            _wait_for(lambda: scores_so_far(config) >= len(events) * 0.25, 120, "a quarter scored")
            first = leader_of_input_and_scores(cluster)
            cluster.kill(first)
            kills.append((first, scores_so_far(config), not fed.is_set()))
            _wait_for(lambda: scores_so_far(config) >= len(events) * 0.45, FAILOVER_S + 60,
                      "scoring to go on without the killed leader")
            cluster.restart(first)
            _wait_for(lambda: fully_replicated(cluster, ["in", "scores"]), 120, f"node {first} back in sync")
            second = leader_of_input_and_scores(cluster)
            cluster.kill(second)
            kills.append((second, scores_so_far(config), not fed.is_set()))
            fed.wait(timeout=240)
            assert not failures, f"the feed failed: {failures[0]!r}"
            _wait_for(lambda: set(retrying(lambda: scored_ids(config))) >= {e["event_id"] for e in events}
                      and retrying(lambda: all_committed(config)),
                      FAILOVER_S + 120, "every event scored and committed")
            assert job.poll() is None, f"the job stopped: {log.read_text()[-3000:]}"
            stop_gracefully(job, log)
        finally:
            if job.poll() is None:
                job.kill()
        scored: Counter = scored_ids(config)
        committed_to = input_ends(config)
    missing = {e["event_id"] for e in events} - set(scored)
    duplicates = sum(scored.values()) - len(scored)
    print(f"\n3 Kafka nodes, RF 3, min.insync.replicas 2, acks=all; {len(events)} events at {EVENTS_PER_S}/s; "
          f"SIGKILLed leaders (node, scores so far, while fed): {kills}; {len(scored)} event ids scored, {duplicates} duplicate "
          f"scores ({duplicates / len(scored):.1%}), {len(missing)} missing, offsets committed to {committed_to}, "
          f"{time.monotonic() - started:.0f} s in all")
    assert not missing
