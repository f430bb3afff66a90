"""The splittable Kafka source against the real broker (bounded reads on the FnApiRunner)."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from schemas.serde import EVENT, AvroEncoder, EventTimeReader
from tests.kafka_helpers import produce_all
from transforms.event_time import WatermarkPolicy
from transforms.kafka_client import ensure_topics, make_consumer, resolve_partitions
from transforms.kafka_source import ReadFromKafkaPartitions

START_MS = 1_750_000_000_000


def _read(kafka_config, partitions, check, event_time_of=None, **read_options) -> None:
    with beam.Pipeline(options=PipelineOptions(["--direct_num_workers", "1"])) as pipeline:
        polls = pipeline | ReadFromKafkaPartitions(kafka_config, partitions, event_time_of=event_time_of,
                                                   **read_options)
        bad_polls = polls | "Check" >> beam.Map(_poll_in_order) | "Bad" >> beam.Filter(lambda in_order: not in_order)
        assert_that(bad_polls, equal_to([]), label="every poll in order")
        check(polls | "Records" >> beam.FlatMap(lambda poll: poll))


def _poll_in_order(poll, ts=beam.DoFn.TimestampParam) -> bool:
    """A poll's records: one partition, offsets rising, stamped with the earliest event time."""
    return (len({r.partition for r in poll}) == 1 and [r.offset for r in poll] == sorted(r.offset for r in poll)
            and ts.micros // 1000 == min(r.event_time_ms for r in poll))


def _event(i: int) -> dict:
    """Event times ten days old, out of order within groups of four."""
    return {"event_id": f"e{i}", "device_id": f"k{i % 7}", "event_time": START_MS + (i ^ 3) * 250, "readings": {}}


def test_bounded_read_returns_every_record_once_with_spans_and_event_time_watermarks(kafka_config, topic_names):
    topic = topic_names("in")
    ensure_topics(kafka_config, [topic], partitions=3)
    encode = AvroEncoder(EVENT)
    # The producer's default timestamps: the send time, not the event time.
    messages = [(f"k{i % 7}".encode(), encode(_event(i)), None) for i in range(3000)]
    produce_all(kafka_config, topic, messages)
    partitions = resolve_partitions(kafka_config, topic, "earliest", "g", bounded=True)
    assert sum(p.stop_offset for p in partitions) == 3000

    def check(records):
        assert_that(records | beam.Map(lambda r: r.value), equal_to([m[1] for m in messages]), label="values")
        spans = records | beam.Map(lambda r: (r.partition, r.span_start, r.offset)) | beam.combiners.ToList()

        def contiguous(lists):
            (spans_list,) = lists
            by_partition: dict = {}
            for partition, start, offset in spans_list:
                by_partition.setdefault(partition, []).append((start, offset))
            for p in partitions:
                covered = sorted(by_partition.get(p.partition, []))
                assert covered[0][0] == 0 and covered[-1][1] == p.stop_offset - 1
                assert all(a[1] + 1 == b[0] for a, b in zip(covered, covered[1:]))

        assert_that(spans, contiguous, label="spans")
        times = records | "Times" >> beam.Map(lambda r: (r.partition, r.offset, r.event_time_ms, r.watermark_ms))
        assert_that(times | "AllTimes" >> beam.combiners.ToList(), _event_time_watermarks, label="watermarks")

    # Small calls force many checkpoints (defer_remainder) per partition: the clock survives them.
    _read(kafka_config, partitions, check, event_time_of=EventTimeReader(),
          policy=WatermarkPolicy(max_out_of_orderness_ms=1_000), max_records_per_call=250)


def _event_time_watermarks(lists) -> None:
    """Each record: its payload's event time, and the newest event time of its partition so far - 1 s."""
    (rows,) = lists
    newest: dict = {}
    for partition, _, event_time, watermark in sorted(rows):
        assert START_MS <= event_time < START_MS + 3000 * 250
        newest[partition] = max(newest.get(partition, event_time), event_time)
        assert watermark == newest[partition] - 1_000, (partition, event_time, watermark)


def test_read_starts_at_committed_offsets_and_stops_at_the_bounds(kafka_config, topic_names):
    topic = topic_names("in")
    ensure_topics(kafka_config, [topic], partitions=1)
    produce_all(kafka_config, topic, [(None, f"v{i}".encode(), START_MS + i) for i in range(100)])
    consumer = make_consumer(kafka_config, group_id="resume")
    consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(60, "", -1)})
    consumer.close()
    partitions = resolve_partitions(kafka_config, topic, "committed", "resume", bounded=True)
    assert [(p.start_offset, p.stop_offset) for p in partitions] == [(60, 100)]
    produce_all(kafka_config, topic, [(None, b"after-launch", None)])

    _read(kafka_config, partitions,
          lambda records: assert_that(records | beam.Map(lambda r: r.value),
                                      equal_to([f"v{i}".encode() for i in range(60, 100)])))


def test_latest_starts_after_existing_records(kafka_config, topic_names):
    topic = topic_names("in")
    ensure_topics(kafka_config, [topic], partitions=2)
    produce_all(kafka_config, topic, [(f"k{i}".encode(), b"old", None) for i in range(50)])
    partitions = resolve_partitions(kafka_config, topic, "latest", "g", bounded=True)
    assert sum(p.stop_offset - p.start_offset for p in partitions) == 0
