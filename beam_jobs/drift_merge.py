"""The drift merger of a ``--local_processes`` job: fleet-wide drift windows from the scoring processes' partials.

    python -m beam_jobs.drift_merge --drift_partials_topic TOPIC [the job's options]

Each scoring process of a ``--local_processes`` job reads some of the input
partitions, so none sees the whole fleet. Each writes its drift partial
summaries (per feature, window, input partition and bundle) to the partials
topic instead of closing windows itself; this job reads every partition of
that topic and closes the windows with the same transform a single job uses
(``transforms.drift.CloseDriftWindows``), so the drift and retrain topics
get one record per window and feature, as from a single process.

It starts at the partials topic's committed offsets of the group
``CONSUMER_GROUP-drift-merge``, which the launcher sets to the topic's end
when it starts the scoring processes: partials of an earlier run are not
merged into this one's windows. Streaming, windows close on the partials'
watermark evidence; ``--bounded``, it reads what the scoring processes
wrote and closes every window by Beam windowing at the end, as a bounded
single job does. The launcher (beam_jobs/local_processes.py) starts and
stops it; it is not meant to be run by hand except to debug.
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs.drift_output import drift_closer, drift_reference, drift_topics
from beam_jobs.options import SensorScoringOptions, kafka_config
from beam_jobs.pipelines import new_pipeline, run_to_end
from models.drift_reference import DriftReference
from transforms.drift_partials import PartialsFromRecordsFn
from transforms.kafka_client import PartitionDescriptor, resolve_partitions
from transforms.kafka_sink import WriteToKafka
from transforms.kafka_source import ReadFromKafkaPartitions

_LOG = logging.getLogger("drift_merge")
PROG = "python -m beam_jobs.drift_merge"


def merge_group(opts: SensorScoringOptions) -> str:
    """The consumer group whose committed offsets say where the merger starts."""
    return f"{opts.consumer_group}-drift-merge"


def build_merge_pipeline(pipeline: beam.Pipeline, opts: SensorScoringOptions, partitions: list[PartitionDescriptor],
                         reference: DriftReference) -> None:
    """Partials topic -> CloseDriftWindows -> drift and retrain topics."""
    config = kafka_config(opts)
    _ = (
        pipeline
        # The scoring processes write each partial with its window start as record timestamp.
        | "ReadPartials" >> ReadFromKafkaPartitions(config, partitions, event_time_of=None,
                                                    fetch_max_wait_ms=opts.fetch_max_wait_ms)
        | "DecodePartials" >> beam.ParDo(PartialsFromRecordsFn(opts.wire_format))
        | "Drift" >> drift_closer(opts, reference)
        | "WriteDrift" >> WriteToKafka(config, drift_topics(opts))
    )


def run(argv: list[str]) -> None:
    options = PipelineOptions(argv)
    opts = options.view_as(SensorScoringOptions)
    if not opts.drift_partials_topic:
        raise SystemExit("python -m beam_jobs.drift_merge needs --drift_partials_topic")
    reference = drift_reference(opts)
    if reference is None:
        return
    options.view_as(StandardOptions).streaming = not opts.bounded
    partitions = resolve_partitions(kafka_config(opts), opts.drift_partials_topic, "committed", merge_group(opts),
                                    opts.bounded)
    _LOG.info("merging drift partials from %s", opts.drift_partials_topic)
    pipeline = new_pipeline(options)
    build_merge_pipeline(pipeline, opts, partitions, reference)
    run_to_end(pipeline)


if __name__ == "__main__":
    from beam_jobs.sensor_scoring import main

    main(entry=run, doc=__doc__, prog=PROG)
