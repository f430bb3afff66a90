"""Reads Kafka partitions with a splittable DoFn over offset ranges (no Java).

Each element is a :class:`PartitionDescriptor`; its restriction is the offset
range still to read. Each poll's records leave as one :data:`RecordBatch`,
so the decode step runs once per poll. A ``process()`` call reads at most ``max_records_per_call``
records or ``max_seconds_per_call`` seconds and then checkpoints with
``defer_remainder``, so a runner such as Flink can snapshot between calls.
Consumers use manual assignment only, as Beam's KafkaIO does.

``fetch_max_wait_ms`` (50, kafka-python's default is 500) bounds how long a
fetch that finds nothing new is held by the broker. Kafka answers a held
fetch as soon as data arrives, but the embedded Tansu broker holds it the
whole time: with 500 ms a record written just after a fetch waited up to
0.5 s before the job saw it (measured: 116 ms median at 500, 19 ms at 100,
4 ms at 10). 50 ms costs at most 20 empty fetches a second per partition.

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
from typing import Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from kafka import KafkaConsumer, TopicPartition

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
    ``watermark_ms`` is the partition's watermark when the record was read.
    """

    topic: str
    partition: int
    offset: int
    span_start: int
    key: Optional[bytes]
    value: bytes
    timestamp_ms: int
    watermark_ms: int


RecordBatch = Tuple[KafkaRecord, ...]  # the records of one poll of one partition, in offset order


def stamped_batch(records: list[KafkaRecord]) -> WindowedValue:
    """The records as one RecordBatch, stamped with the earliest record timestamp among them."""
    return stamped(tuple(records), min(r.timestamp_ms for r in records))


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


class _ManualWatermarkProvider(WatermarkEstimatorProvider):
    def initial_estimator_state(self, element: PartitionDescriptor, restriction: OffsetRange) -> None:
        return None

    def create_watermark_estimator(self, estimator_state: Optional[Timestamp]) -> ManualWatermarkEstimator:
        return ManualWatermarkEstimator(estimator_state)


class _ReadPartitionFn(beam.DoFn):
    """Polls one partition per element; see the module docstring."""

    def __init__(
        self,
        config: KafkaConfig,
        *,
        max_records_per_call: int = 1000,
        max_seconds_per_call: float = 1.0,
        poll_timeout_ms: int = 200,
        idle_resume_s: float = 0.2,
        fetch_max_wait_ms: int = 50,
    ):
        self._config = config
        self._max_records = max_records_per_call
        self._max_seconds = max_seconds_per_call
        self._poll_timeout_ms = poll_timeout_ms
        self._idle_resume_s = idle_resume_s
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._records_read = beam.metrics.Metrics.counter(_METRICS, "records_read")
        self._idle_polls = beam.metrics.Metrics.counter(_METRICS, "idle_polls")

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
        watermark: ManualWatermarkEstimator = beam.DoFn.WatermarkEstimatorParam(_ManualWatermarkProvider()),
    ) -> Iterator[WindowedValue]:
        tp = TopicPartition(element.topic, element.partition)
        restriction = tracker.current_restriction()
        if _DRAINING.is_set():
            tracker.try_claim(restriction.stop)  # read no further: the rest is for the next run
            return
        consumer = self._consumer_at(tp, restriction.start)
        next_span = restriction.start
        wm_ms = _millis(watermark.current_watermark())
        deadline = time.monotonic() + self._max_seconds
        emitted = 0
        while emitted < self._max_records and time.monotonic() < deadline and not _DRAINING.is_set():
            poll_started = time.monotonic()
            asked = self._max_records - emitted
            batch = consumer.poll(timeout_ms=self._poll_timeout_ms, max_records=asked).get(tp)
            if not batch:
                if consumer.position(tp) >= restriction.stop:
                    tracker.try_claim(restriction.stop)  # the bounded range is read
                    return
                self._idle_polls.inc()
                # Caught up: event time moves on with the wall clock while nothing arrives.
                idle_ms = int((time.monotonic() - poll_started + self._idle_resume_s) * 1000)
                if wm_ms is not None:
                    watermark.set_watermark(Timestamp.of((wm_ms + idle_ms) / 1000))
                tracker.defer_remainder(Duration.of(self._idle_resume_s))
                return
            records = []
            for record in batch:
                if not tracker.try_claim(record.offset):
                    break
                wm_ms = record.timestamp if wm_ms is None else max(wm_ms, record.timestamp)
                records.append(KafkaRecord(record.topic, record.partition, record.offset, next_span,
                                           record.key, record.value, record.timestamp, wm_ms))
                next_span = record.offset + 1
            if records:
                yield stamped_batch(records)
            if len(records) < len(batch):
                return  # the rest of the range was split off
            emitted += len(batch)
            LIVE.batch_read(partition_key(tp.topic, tp.partition), batch[0].offset, len(batch), consumer.highwater(tp))
            self._records_read.inc(len(batch))
            watermark.set_watermark(Timestamp.of(wm_ms / 1000))
            if len(batch) < asked:
                break  # caught up: hand what was read on now instead of polling until the call's deadline
        tracker.defer_remainder()


def _millis(ts: Optional[Timestamp]) -> Optional[int]:
    if ts is None or ts <= beam.utils.timestamp.MIN_TIMESTAMP:
        return None
    return ts.micros // 1000


class ReadFromKafkaPartitions(beam.PTransform):
    """Reads the given partitions; each from its start offset to its stop offset or forever.

    One element per poll of a partition, a :data:`RecordBatch` stamped with
    its earliest record timestamp: the steps that read it run once per poll,
    not once per record.
    """

    def __init__(self, config: KafkaConfig, partitions: list[PartitionDescriptor], **read_options):
        super().__init__()
        if not partitions:
            raise ValueError("no partitions to read")
        self._config = config
        self._partitions = partitions
        self._read_options = read_options

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RecordBatch]:
        return (
            pbegin
            | "Partitions" >> beam.Create(self._partitions)
            | "Read" >> beam.ParDo(_ReadPartitionFn(self._config, **self._read_options)).with_output_types(RecordBatch)
        )
