"""Reads Kafka partitions with a splittable DoFn over offset ranges (no Java).

Each element is a :class:`PartitionDescriptor`; its restriction is the offset
range still to read. Each poll's records leave as one :data:`RecordBatch`,
so the decode step runs once per poll. A ``process()`` call reads at most ``max_records_per_call``
records or ``max_seconds_per_call`` seconds and then checkpoints with
``defer_remainder``, so a runner such as Flink can snapshot between calls.
Consumers use manual assignment only, as Beam's KafkaIO does.

Time: the watermark and every element's timestamp are event time, read
from the payload by ``event_time_of`` (for SensorEvent, schemas.serde.
EventTimeReader), under a :class:`~transforms.event_time.WatermarkPolicy`
kept per partition in the watermark estimator's state. Kafka's record
timestamp is left alone: producers set it to whatever they like (see
transforms/event_time.py). Only an internal topic whose records this job
writes itself with the event time as record timestamp (the drift partials
of ``--local_processes``) passes ``event_time_of=None`` to use it.

``fetch_max_wait_ms`` (500, Kafka's default; the job's ``--fetch_max_wait_ms``)
bounds how long the broker holds a fetch that finds nothing new. Apache Kafka
answers a held fetch as soon as data arrives: a record reached ``poll()`` in
2.7 ms median at 50 and at 500 (benchmarks/broker_settings.py), and 500 costs
2 empty fetches a second per idle partition instead of 20. The embedded Tansu
holds it the whole wait (16 ms median at 50, 130 ms at 500), so its launchers
pass 50 (beam_jobs/local_broker.job_flags).

``max_records_per_call`` also bounds what is in flight: the in-process runner
hands a downstream stage everything read since its last bundle, and offsets
are committed only when the sink's bundle ends. With 5000 a 30,000-event
backlog was scored as one bundle, so a crash re-scored all of it; with 1000,
commits follow a backlog as it is worked off (tests/test_faults.py).

:func:`request_drain` ends every read of this process at its next poll, as
if the partition had ended there: the pipeline then finishes what is in
flight, writes it, commits its offsets and ends (the job's SIGINT/SIGTERM).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.iobase import WatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from kafka import KafkaConsumer, TopicPartition

from transforms.event_time import EARLIEST_EVENT_MS, PartitionClock, WatermarkPolicy
from transforms.kafka_client import KafkaConfig, PartitionDescriptor, make_consumer
from transforms.live_stats import LIVE
from transforms.offset_commits import partition_key
from transforms.windowing import stamped

_LOG = logging.getLogger(__name__)
_UNBOUNDED_STOP = 2**63 - 1
_METRICS = "kafka_source"
_DRAINING = threading.Event()


def request_drain() -> None:
    """Stops reading in this process; records not read stay uncommitted, for the next run."""
    _DRAINING.set()


class KafkaRecord(NamedTuple):
    """One Kafka message and where it came from.

    ``span_start`` is the first offset this record accounts for: offsets
    between the previous record and this one (compaction, transaction markers)
    are acknowledged together with it, so committed offsets can advance past them.
    ``timestamp_ms`` is Kafka's record timestamp, kept for the record tool only;
    ``event_time_ms`` the event time read from the payload (None: unreadable),
    and ``watermark_ms`` the partition's event-time watermark when the record
    was read (None before any readable event time).
    """

    topic: str
    partition: int
    offset: int
    span_start: int
    key: Optional[bytes]
    value: bytes
    timestamp_ms: int
    event_time_ms: Optional[int]
    watermark_ms: Optional[int]


RecordBatch = Tuple[KafkaRecord, ...]  # the records of one poll of one partition, in offset order
EventTimeOf = Callable[[bytes], Optional[int]]  # a record value's event time in epoch millis, None if unreadable


def stamped_batch(records: list[KafkaRecord]) -> WindowedValue:
    """The records as one RecordBatch, stamped with the earliest event time among them.

    A batch with no readable event time (dead letters to be) gets its
    watermark: it holds nothing back and is never late.
    """
    times = [r.event_time_ms for r in records if r.event_time_ms is not None]
    if times:
        return stamped(tuple(records), min(times))
    return stamped(tuple(records), max((r.watermark_ms or EARLIEST_EVENT_MS) for r in records))


def timed_records(observe: Callable[[Optional[int], int], Optional[int]], event_time_of: Optional[EventTimeOf],
                  records: list[tuple]) -> Iterator[KafkaRecord]:
    """(topic, partition, offset, span_start, key, value, record timestamp) -> KafkaRecords.

    `observe` is the partition clock's (:meth:`PartitionClock.observe`).
    One place for the event-time rule of the Kafka source and of file mode, so
    a recording read from files and its replay through Kafka carry the same
    times and watermarks.
    """
    now_ms = int(time.time() * 1000)
    for topic, partition, offset, span_start, key, value, timestamp_ms in records:
        event_time = timestamp_ms if event_time_of is None else event_time_of(value)
        watermark = observe(event_time, now_ms)
        yield KafkaRecord(topic, partition, offset, span_start, key, value, timestamp_ms, event_time, watermark)


class _UnboundedOffsetTracker(OffsetRestrictionTracker):
    def is_bounded(self) -> bool:
        return False


class _OffsetRangeProvider(RestrictionProvider):
    def initial_restriction(self, element: PartitionDescriptor) -> OffsetRange:
        stop = _UNBOUNDED_STOP if element.stop_offset is None else element.stop_offset
        return OffsetRange(element.start_offset, max(stop, element.start_offset))

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        if restriction.stop == _UNBOUNDED_STOP:
            return _UnboundedOffsetTracker(restriction)
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element: PartitionDescriptor, restriction: OffsetRange) -> int:
        return 1 if restriction.stop == _UNBOUNDED_STOP else restriction.size()

    def truncate(self, element: PartitionDescriptor, restriction: OffsetRange) -> Optional[OffsetRange]:
        # On drain an unbounded read stops; a bounded one is finished.
        return None if restriction.stop == _UNBOUNDED_STOP else restriction


class _EventTimeWatermark(WatermarkEstimator):
    """A partition's :class:`PartitionClock` as Beam's watermark estimator; its state is the clock's.

    Beam hands the DoFn a thread-safe proxy of it, which passes on method calls only.
    """

    def __init__(self, clock: PartitionClock):
        self.clock = clock

    def observe(self, event_time_ms: Optional[int], now_ms: int) -> Optional[int]:
        return self.clock.observe(event_time_ms, now_ms)

    def idle(self, now_ms: int) -> None:
        self.clock.idle(now_ms)

    def observe_timestamp(self, timestamp: Timestamp) -> None:
        pass  # the clock is moved by the records' event times, not by output timestamps

    def current_watermark(self) -> Optional[Timestamp]:
        wm = self.clock.watermark_ms
        return None if wm is None else Timestamp(micros=wm * 1000)

    def get_estimator_state(self) -> tuple[Optional[int], Optional[int], Optional[int]]:
        return self.clock.state()


class _ReadPartitionFn(beam.DoFn, WatermarkEstimatorProvider):
    """Polls one partition per element; see the module docstring.

    It is its own watermark estimator provider: each partition's estimator is
    a :class:`PartitionClock` under the read's policy.
    """

    def __init__(
        self,
        config: KafkaConfig,
        *,
        event_time_of: Optional[EventTimeOf],
        policy: WatermarkPolicy = WatermarkPolicy(),
        max_records_per_call: int = 1000,
        max_seconds_per_call: float = 1.0,
        poll_timeout_ms: int = 200,
        idle_resume_s: float = 0.2,
        fetch_max_wait_ms: int = 500,
    ):
        self._config = config
        self._event_time_of = event_time_of
        self._policy = policy
        self._max_records = max_records_per_call
        self._max_seconds = max_seconds_per_call
        self._poll_timeout_ms = poll_timeout_ms
        self._idle_resume_s = idle_resume_s
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._records_read = beam.metrics.Metrics.counter(_METRICS, "records_read")
        self._idle_polls = beam.metrics.Metrics.counter(_METRICS, "idle_polls")

    def initial_estimator_state(self, element: PartitionDescriptor, restriction: OffsetRange) -> tuple:
        return PartitionClock(self._policy).state()

    def create_watermark_estimator(self, estimator_state: tuple) -> _EventTimeWatermark:
        return _EventTimeWatermark(PartitionClock(self._policy, *estimator_state))

    def setup(self) -> None:
        self._consumers: dict[TopicPartition, KafkaConsumer] = {}

    def teardown(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()

    def _consumer_at(self, tp: TopicPartition, offset: int) -> KafkaConsumer:
        consumer = self._consumers.get(tp)
        if consumer is None:
            consumer = make_consumer(self._config, max_partition_fetch_bytes=4 * 1024 * 1024,
                                     fetch_max_wait_ms=self._fetch_max_wait_ms)
            consumer.assign([tp])
            self._consumers[tp] = consumer
        if consumer.position(tp) != offset:
            consumer.seek(tp, offset)
        return consumer

    def process(
        self,
        element: PartitionDescriptor,
        tracker: OffsetRestrictionTracker = beam.DoFn.RestrictionParam(_OffsetRangeProvider()),
        watermark: _EventTimeWatermark = beam.DoFn.WatermarkEstimatorParam(),
    ) -> Iterator[WindowedValue]:
        tp = TopicPartition(element.topic, element.partition)
        restriction = tracker.current_restriction()
        if _DRAINING.is_set():
            tracker.try_claim(restriction.stop)  # read no further: the rest is for the next run
            return
        consumer = self._consumer_at(tp, restriction.start)
        next_span = restriction.start
        deadline = time.monotonic() + self._max_seconds
        emitted = 0
        while emitted < self._max_records and time.monotonic() < deadline and not _DRAINING.is_set():
            asked = self._max_records - emitted
            batch = consumer.poll(timeout_ms=self._poll_timeout_ms, max_records=asked).get(tp)
            if not batch:
                if consumer.position(tp) >= restriction.stop:
                    tracker.try_claim(restriction.stop)  # the bounded range is read
                    return
                self._idle_polls.inc()
                if _caught_up(consumer, tp):  # event time moves on with the wall clock while nothing arrives
                    watermark.idle(int(time.time() * 1000))
                tracker.defer_remainder(Duration.of(self._idle_resume_s))
                return
            claimed = []
            for record in batch:
                if not tracker.try_claim(record.offset):
                    break
                claimed.append((record.topic, record.partition, record.offset, next_span, record.key, record.value,
                                record.timestamp))
                next_span = record.offset + 1
            if claimed:
                yield stamped_batch(list(timed_records(watermark.observe, self._event_time_of, claimed)))
            if len(claimed) < len(batch):
                return  # the rest of the range was split off
            emitted += len(batch)
            LIVE.batch_read(partition_key(tp.topic, tp.partition), batch[0].offset, len(batch), consumer.highwater(tp))
            self._records_read.inc(len(batch))
            if len(batch) < asked:
                break  # caught up: hand what was read on now instead of polling until the call's deadline
        tracker.defer_remainder()


def _caught_up(consumer: KafkaConsumer, tp: TopicPartition) -> bool:
    """At the end of the log as the last fetch saw it: an empty poll before that is the broker being slow."""
    highwater = consumer.highwater(tp)
    return highwater is not None and consumer.position(tp) >= highwater


class ReadFromKafkaPartitions(beam.PTransform):
    """Reads the given partitions; each from its start offset to its stop offset or forever.

    One element per poll of a partition, a :data:`RecordBatch` stamped with
    its earliest event time: the steps that read it run once per poll, not
    once per record. `event_time_of` reads a value's event time (None: the
    record timestamp, for internal topics only: see the module docstring);
    `policy` sets the watermark's out-of-orderness and the allowed lateness.
    """

    def __init__(self, config: KafkaConfig, partitions: list[PartitionDescriptor], *,
                 event_time_of: Optional[EventTimeOf], policy: WatermarkPolicy = WatermarkPolicy(), **read_options):
        super().__init__()
        if not partitions:
            raise ValueError("no partitions to read")
        self._config = config
        self._partitions = partitions
        self._read_options = dict(read_options, event_time_of=event_time_of, policy=policy)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RecordBatch]:
        return (
            pbegin
            | "Partitions" >> beam.Create(self._partitions)
            | "Read" >> beam.ParDo(_ReadPartitionFn(self._config, **self._read_options)).with_output_types(RecordBatch)
        )
