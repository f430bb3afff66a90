"""Commits consumed offsets only once every record before them has been written.

Each sink reports, per bundle, the offset spans of the input records whose
outputs (scores or dead letters) the broker acknowledged. This stateful DoFn,
keyed by partition, joins the spans into a contiguous prefix and commits its
end to the consumer group after its own bundle is finalised, that is after
the runner has made the state that justifies the commit durable.
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from typing import Iterable, Iterator, List, NamedTuple, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from transforms.kafka_client import KafkaConfig, PartitionDescriptor, make_consumer
from transforms.state_cache import skip_module_globals_scan

_LOG = logging.getLogger(__name__)
_METRICS = "offset_commits"


class SourcePosition(NamedTuple):
    """Where an input record came from; ``[span_start, offset]`` is what its output acknowledges."""

    topic: str
    partition: int
    offset: int
    span_start: int


Span = tuple[int, int]  # [start, end) offsets


def partition_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def split_partition_key(key: str) -> tuple[str, int]:
    """partition_key's topic and partition back (a topic name may hold colons)."""
    topic, partition = key.rsplit(":", 1)
    return topic, int(partition)


def compact_spans(positions: Iterable[SourcePosition]) -> dict[str, list[Span]]:
    """Acknowledged positions as few [start, end) spans per partition."""
    per_partition: dict[str, list[Span]] = {}
    for p in positions:
        per_partition.setdefault(partition_key(p.topic, p.partition), []).append((p.span_start, p.offset + 1))
    return {key: merge_spans(spans) for key, spans in per_partition.items()}


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def advance(committed: int, pending: list[Span]) -> tuple[int, list[Span]]:
    """The new contiguous end and the spans still waiting for a gap to fill."""
    remaining = []
    for start, end in merge_spans(pending):
        if start <= committed:
            committed = max(committed, end)
        else:
            remaining.append((start, end))
    return committed, remaining


class GroupCommits:
    """What one job run has committed to its consumer group from this process; commits one at a time.

    A runner may call several bundles' finalizers at once, on other threads
    and other DoFn instances: Flink calls those of every bundle since the last
    checkpoint when it completes. Two commits of a partition in flight on two
    connections reach the broker in either order, so the older, lower one
    could land last; and once the partition's records are all read, nothing
    asks again. After a TaskManager kill that left partition 0 at 1,051 of
    2,100 for good (tests/test_flink.py). So the commits of one run go through
    one lock per process, and an offset not past what the broker accepted
    from it is not sent. Only an accepted commit counts: one registered
    before a crash or a restart may never run (its finalizer is lost), and a
    runner may keep DoFn instances across a restart, so until then every
    element that reaches past it asks again.
    """

    _lock = threading.Lock()
    _of_run: dict[str, "GroupCommits"] = {}

    def __init__(self, start_offsets: dict[str, int]):
        self._start_offsets = start_offsets
        self._accepted: dict[str, int] = {}
        self._commit_lock = threading.Lock()

    @classmethod
    def of_run(cls, run_id: str, start_offsets: dict[str, int]) -> "GroupCommits":
        """The process's one instance for the job run `run_id`, shared by all its DoFn instances."""
        with cls._lock:
            return cls._of_run.setdefault(run_id, cls(start_offsets))

    def accepted(self, key: str) -> int:
        """The partition's offset as last accepted by the broker from this run (its start offset before)."""
        return self._accepted.get(key, self._start_offsets[key])

    def commit(self, consumer: KafkaConsumer, offsets: dict[str, int]) -> dict[str, int]:
        """Commits those of `offsets` past what was accepted, synchronously; returns what it committed."""
        with self._commit_lock:
            ahead = {key: offset for key, offset in offsets.items() if offset > self.accepted(key)}
            if ahead:
                consumer.commit({TopicPartition(*split_partition_key(key)): OffsetAndMetadata(offset, "", -1)
                                 for key, offset in ahead.items()})
                self._accepted.update(ahead)
            return ahead


class _CommitContiguousFn(beam.DoFn):
    NEXT_OFFSET = ReadModifyWriteStateSpec("next_offset", PickleCoder())
    PENDING = ReadModifyWriteStateSpec("pending_spans", PickleCoder())

    def __init__(self, config: KafkaConfig, group_id: str, start_offsets: dict[str, int]):
        self._config = config
        self._group_id = group_id
        self._start_offsets = start_offsets
        self._run_id = f"{group_id}/{uuid.uuid4()}"  # one per pipeline built: a pickled copy keeps it
        self._commits = beam.metrics.Metrics.counter(_METRICS, "commits")
        self._waiting = beam.metrics.Metrics.gauge(_METRICS, "spans_waiting_for_gap")

    def setup(self) -> None:
        skip_module_globals_scan()
        self._consumer = make_consumer(self._config, group_id=self._group_id)
        self._group_commits = GroupCommits.of_run(self._run_id, self._start_offsets)

    def teardown(self) -> None:
        self._consumer.close()

    def start_bundle(self) -> None:
        self._to_commit: dict[str, int] = {}

    def process(
        self,
        element: tuple[str, list[Span]],
        finalizer=beam.DoFn.BundleFinalizerParam,
        next_offset=beam.DoFn.StateParam(NEXT_OFFSET),
        pending=beam.DoFn.StateParam(PENDING),
    ) -> Iterator[tuple[str, int]]:
        key, spans = element
        before = next_offset.read()
        if before is None:
            before = self._start_offsets[key]
        after, waiting = advance(before, (pending.read() or []) + list(spans))
        next_offset.write(after)
        pending.write(waiting)
        self._waiting.set(len(waiting))
        if after > self._group_commits.accepted(key):
            if not self._to_commit:
                finalizer.register(functools.partial(self._commit, self._to_commit))
            self._to_commit[key] = after
            if after > before:
                yield key, after

    def _commit(self, to_commit: dict[str, int]) -> None:
        """The bundle's finalizer: commits what it advanced, never behind what this run committed before."""
        committed = self._group_commits.commit(self._consumer, to_commit)
        self._commits.inc(len(committed))
        if committed:
            _LOG.debug("committed %s", committed)


def commit_finished_reads(config: KafkaConfig, group_id: str, partitions: list[PartitionDescriptor]) -> dict[str, int]:
    """After a bounded job ended successfully: commits each partition's stop offset where the group is behind it.

    A bounded job that ended without error has written and flushed the
    output of every record up to its stop offsets (a failed send fails the
    job), so they may be committed. It is what the commit step's bundle
    finalizer does on runners that call finalizers; Flink never calls them in
    batch (apache/beam #19525, #19526), so ``--bounded`` on Flink commits here.
    Never moves a group backwards. Returns what it committed.
    """
    consumer = make_consumer(config, group_id=group_id)
    try:
        offsets = {}
        for p in partitions:
            tp = TopicPartition(p.topic, p.partition)
            if p.stop_offset is not None and p.stop_offset > (consumer.committed(tp) or 0):
                offsets[tp] = OffsetAndMetadata(p.stop_offset, "", -1)
        if offsets:
            consumer.commit(offsets)
        return {partition_key(tp.topic, tp.partition): o.offset for tp, o in offsets.items()}
    finally:
        consumer.close()


class CommitOffsets(beam.PTransform):
    """Consumes per-bundle ack spans; outputs (partition key, committed offset) after each advance."""

    def __init__(self, config: KafkaConfig, group_id: str, partitions: list[PartitionDescriptor]):
        super().__init__()
        self._config = config
        self._group_id = group_id
        self._start_offsets = {partition_key(p.topic, p.partition): p.start_offset for p in partitions}

    def expand(self, acks: beam.PCollection[tuple[str, list[Span]]]) -> beam.PCollection[tuple[str, int]]:
        return acks | "CommitContiguous" >> beam.ParDo(
            _CommitContiguousFn(self._config, self._group_id, self._start_offsets)
        ).with_input_types(Tuple[str, List[Tuple[int, int]]])
