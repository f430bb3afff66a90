"""File mode's I/O: recordings in as Kafka-like records, Avro object-container files out.

The job's file mode swaps only the ends of the pipeline: the same
``ScoreSensorRecords`` runs between these transforms as between the Kafka
source and sink, so a recording scores exactly as its replay through Kafka.

Each event becomes a :class:`KafkaRecord` with a synthetic, deterministic
position: topic = the file's path, partition 0, offset = the event's index in
the file. Dead letters therefore say which file and which event. Times follow the Kafka source's rule (transforms/event_time.py), a
file being one partition that is never idle, so each record carries the
event time and watermark its replay through Kafka gives.
"""

from __future__ import annotations

from typing import Iterator

import apache_beam as beam
from apache_beam.io.avroio import WriteToAvro
from apache_beam.utils.windowed_value import WindowedValue

from beam_jobs.recordings import expand_paths, read_events
from schemas.serde import EVENT, AvroDecoder, AvroEncoder, current_schema
from transforms.kafka_sink import OutgoingMessage
from transforms.event_time import PartitionClock, WatermarkPolicy
from transforms.kafka_source import RecordBatch, stamped_batch, timed_records

FILE_PARTITION = 0


def file_records(path: str, wire_format: str, policy: WatermarkPolicy = WatermarkPolicy(),
                 batch_size: int = 1000) -> Iterator[WindowedValue]:
    """The events of one recording as KafkaRecords, `batch_size` to a RecordBatch stamped by its earliest event."""
    encode = AvroEncoder(EVENT, wire_format)
    clock = PartitionClock(policy)
    batch = []
    for index, event in enumerate(read_events(path)):
        event_time = event["event_time"]
        batch.append((path, FILE_PARTITION, index, index, event["device_id"].encode(), encode(event), event_time))
        if len(batch) == batch_size:
            yield stamped_batch(list(timed_records(clock.observe, None, batch)))
            batch = []
    if batch:
        yield stamped_batch(list(timed_records(clock.observe, None, batch)))


class ReadRecordingAsRecords(beam.PTransform):
    """Recordings matching a glob (checked at launch) to RecordBatches, as the Kafka source gives them."""

    def __init__(self, pattern: str, wire_format: str = "plain", policy: WatermarkPolicy = WatermarkPolicy()):
        super().__init__()
        self._paths = [str(p) for p in expand_paths(pattern)]
        self._wire_format = wire_format
        self._policy = policy

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[RecordBatch]:
        return (
            pbegin
            | "Files" >> beam.Create(self._paths)
            | "Records" >> beam.FlatMap(file_records, self._wire_format, self._policy).with_output_types(RecordBatch)
        )


class WriteAvroFiles(beam.PTransform):
    """OutgoingMessages of record `name` to ``PREFIX-00000-of-00001.avro``, the file-mode twin of WriteToKafka.

    One shard, so every run names its output the same way; the file exists,
    empty, when there are no messages.
    """

    def __init__(self, prefix: str, name: str, wire_format: str = "plain"):
        super().__init__()
        self._prefix = prefix
        self._name = name
        self._wire_format = wire_format

    def expand(self, messages: beam.PCollection[OutgoingMessage]) -> beam.pvalue.PDone:
        decode = AvroDecoder(self._name, self._wire_format)
        return (
            messages
            | "Decode" >> beam.Map(lambda message: decode(message.value))
            | "Write" >> WriteToAvro(self._prefix, current_schema(self._name), file_name_suffix=".avro",
                                     num_shards=1, codec="deflate")
        )
