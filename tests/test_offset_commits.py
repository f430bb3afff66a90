"""Tests of transforms.offset_commits: contiguous spans, and commits to a real broker.

The pure functions are checked against a set-of-offsets oracle; CommitOffsets
runs in a Beam pipeline and its commits are read back with a Kafka consumer.
"""

from __future__ import annotations

import random
import threading
import uuid

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import TopicPartition

from transforms.kafka_client import PartitionDescriptor, ensure_topics, make_consumer
from transforms.offset_commits import (
    CommitOffsets,
    GroupCommits,
    SourcePosition,
    advance,
    compact_spans,
    merge_spans,
    partition_key,
)


@pytest.mark.parametrize(
    "spans, merged",
    [
        ([], []),
        ([(0, 5)], [(0, 5)]),
        ([(5, 10), (0, 5)], [(0, 10)]),  # adjacent, out of order
        ([(0, 5), (6, 10)], [(0, 5), (6, 10)]),  # a gap at offset 5
        ([(3, 8), (0, 5), (7, 9)], [(0, 9)]),  # overlapping
        ([(0, 10), (2, 4)], [(0, 10)]),  # contained
        ([(20, 30), (0, 1), (10, 12), (1, 2)], [(0, 2), (10, 12), (20, 30)]),
    ],
)
def test_merge_spans(spans, merged):
    assert merge_spans(spans) == merged


@pytest.mark.parametrize(
    "committed, pending, result",
    [
        (0, [(0, 5)], (5, [])),
        (0, [(5, 10)], (0, [(5, 10)])),  # the gap [0, 5) holds the commit back
        (0, [(5, 10), (0, 5)], (10, [])),  # filled out of order
        (0, [(0, 5), (6, 10)], (5, [(6, 10)])),
        (5, [(6, 10), (5, 6)], (10, [])),  # the last gap filled
        (10, [(3, 7)], (10, [])),  # already committed: never moves back
        (10, [(3, 12), (15, 20)], (12, [(15, 20)])),
        (0, [], (0, [])),
    ],
)
def test_advance(committed, pending, result):
    assert advance(committed, pending) == result


def _contiguous_end(start: int, acked: set[int]) -> int:
    end = start
    while end in acked:
        end += 1
    return end


@settings(max_examples=300, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 199), max_size=30, unique=True),
    data=st.data(),
)
def test_advance_commits_exactly_the_contiguous_prefix_whatever_the_order(cuts, data):
    """Spans tiling [0, 200) arrive in any order and batching; the commit is always the acked prefix."""
    bounds = [0, *sorted(cuts), 200]
    spans = data.draw(st.permutations(list(zip(bounds, bounds[1:]))), label="arrival order")
    committed, pending, acked = 0, [], set()
    while spans:
        k = data.draw(st.integers(1, len(spans)), label="batch size")
        batch, spans = spans[:k], spans[k:]
        acked.update(o for start, end in batch for o in range(start, end))
        before = committed
        committed, pending = advance(committed, pending + batch)
        assert committed == _contiguous_end(0, acked) >= before
        assert all(start > committed for start, _ in pending)
        assert sum(end - start for start, end in pending) == len({o for o in acked if o >= committed})
    assert (committed, pending) == (200, [])


def test_compact_spans_groups_positions_per_partition():
    positions = [
        SourcePosition("t", 0, 4, 3),  # acknowledges [3, 5)
        SourcePosition("t", 0, 2, 0),  # [0, 3)
        SourcePosition("t", 1, 9, 9),
        SourcePosition("t", 0, 10, 8),
        SourcePosition("other:topic", 0, 0, 0),
    ]
    assert compact_spans(positions) == {"t:0": [(0, 5), (8, 11)], "t:1": [(9, 10)], "other:topic:0": [(0, 1)]}
    assert compact_spans([]) == {}


def test_partition_key_splits_back_at_the_last_colon():
    key = partition_key("ns:events", 12)
    assert key == "ns:events:12" and key.rsplit(":", 1) == ["ns:events", "12"]


def test_commit_offsets_commits_the_contiguous_end_to_the_broker(kafka_config, topic_names):
    topic, group = topic_names("events"), topic_names("group")
    ensure_topics(kafka_config, [topic], partitions=3)
    partitions = [PartitionDescriptor(topic, p, start, None) for p, start in [(0, 0), (1, 0), (2, 100)]]
    p0, p1, p2 = (partition_key(topic, p) for p in range(3))
    acks = [
        (p0, [(5, 10)]), (p0, [(0, 5)]), (p0, [(10, 12), (13, 20)]),  # p0: [0, 12) contiguous, 12 missing
        (p1, [(1, 4)]), (p1, [(4, 8)]),  # p1: offset 0 never acknowledged
        (p2, [(100, 150)]), (p2, [(90, 120)]),  # p2 starts at 100; the older acks are already behind
    ]
    with BeamTestPipeline(runner="FnApiRunner") as pipeline:
        committed = (pipeline | beam.Create(acks) | CommitOffsets(kafka_config, group, partitions)
                     | beam.CombinePerKey(max))
        assert_that(committed, equal_to([(p0, 12), (p2, 150)]))

    consumer = make_consumer(kafka_config, group_id=group)
    try:
        assert consumer.committed(TopicPartition(topic, 0)) == 12
        assert consumer.committed(TopicPartition(topic, 1)) is None  # the gap at 0 keeps it back
        assert consumer.committed(TopicPartition(topic, 2)) == 150
    finally:
        consumer.close()


@pytest.fixture
def one_partition(kafka_config, topic_names) -> tuple[str, str, str, GroupCommits]:
    """A new one-partition topic, a group, the partition's key and a job run's GroupCommits starting at 0."""
    topic, group = topic_names("events"), topic_names("group")
    ensure_topics(kafka_config, [topic], partitions=1)
    key = partition_key(topic, 0)
    return topic, group, key, GroupCommits.of_run(f"{group}/{uuid.uuid4()}", {key: 0})


def test_group_commits_never_move_the_group_back_when_finalizers_run_out_of_order(kafka_config, one_partition):
    """Two bundles' finalizers on two DoFn instances (two consumers), the later bundle's first: the group stays."""
    topic, group, key, run = one_partition
    first, second = (make_consumer(kafka_config, group_id=group) for _ in range(2))
    try:
        assert run.commit(first, {key: 2100}) == {key: 2100}
        assert run.commit(second, {key: 1051}) == {}
        assert run.accepted(key) == 2100
        assert second.committed(TopicPartition(topic, 0)) == 2100
    finally:
        first.close()
        second.close()


def test_group_commits_from_concurrent_finalizers_end_at_the_highest_offset(kafka_config, one_partition):
    """Eight threads, each with its own consumer, commit interleaved offsets of one partition at once."""
    topic, group, key, run = one_partition
    consumers = [make_consumer(kafka_config, group_id=group) for _ in range(8)]
    offsets = list(range(1, 161))
    random.Random(3).shuffle(offsets)
    start = threading.Barrier(len(consumers))

    def commit_share(i: int) -> None:
        start.wait()
        for offset in offsets[i::len(consumers)]:
            run.commit(consumers[i], {key: offset})

    threads = [threading.Thread(target=commit_share, args=(i,)) for i in range(len(consumers))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert consumers[0].committed(TopicPartition(topic, 0)) == 160
    finally:
        for c in consumers:
            c.close()


def test_group_commits_are_one_per_run_and_process():
    assert GroupCommits.of_run("g/a", {"t:0": 5}) is GroupCommits.of_run("g/a", {"t:0": 0})
    assert GroupCommits.of_run("g/b", {"t:0": 0}) is not GroupCommits.of_run("g/a", {"t:0": 5})
    assert GroupCommits.of_run("g/a", {}).accepted("t:0") == 5
