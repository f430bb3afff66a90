"""The streaming anomaly-scoring job.

    python -m beam_jobs.sensor_scoring [--bootstrap_servers HOST:PORT] [--bounded] [Beam flags ...]

Reads SensorEvent messages from Kafka, scores each with the per-device LSTM
and writes SensorScore messages; undecodable or invalid input goes to the
dead-letter topic with the reason. Offsets are committed to the consumer
group only after the outputs of every record before them were written.

File mode, for regression tests and portability checks, scores recordings
(written by python -m beam_jobs.record) with the very same transforms,
bounded and without Kafka, into Avro files in --output_dir:

    python -m beam_jobs.sensor_scoring --input_files 'DIR/*.avro' --output_dir OUT

On one machine, --local_processes N runs the job as N processes on disjoint
input partitions plus a drift merger, to use N cores (beam_jobs/local_processes.py).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from beam_jobs import drift_merge
from beam_jobs.drift_output import write_drift
from beam_jobs.local_processes import PROCESS_LABEL_ENV, LocalProcesses, LocalProcessesError, check_runner
from beam_jobs.monitor import Monitor
from beam_jobs.options import SensorScoringOptions, help_parser, kafka_config, rollout_config, watermark_policy
from beam_jobs.pipelines import (
    calls_bundle_finalizers,
    in_process_streaming,
    new_pipeline,
    reorders_keyed_input,
    run_to_end,
)
from beam_jobs.recordings import RecordingError
from models.artifact import ModelArtifactError
from models.rollout import RolloutError
from schemas.serde import DEAD_LETTER, SCORE, EventTimeReader
from transforms.audit import AUDIT
from transforms.avro_files import ReadRecordingAsRecords, WriteAvroFiles
from transforms.kafka_client import (
    BrokerUnavailable,
    KafkaSecurityError,
    UnknownPartitions,
    ensure_topics,
    resolve_partitions,
    select_partitions,
)
from transforms.kafka_sink import DEAD_LETTERS, SCORES, SHADOW_SCORES, STREAMS, WriteToKafka
from transforms.kafka_source import ReadFromKafkaPartitions, request_drain
from transforms.offset_commits import CommitOffsets, commit_finished_reads
from transforms.pseudonymize import PseudonymizeKeyMissing, pseudonymizer_from_env
from transforms.score_records import ScoreSensorRecords

_LOG = logging.getLogger("sensor_scoring")


def build_pipeline(pipeline: beam.Pipeline, opts: SensorScoringOptions, partitions) -> None:
    """Kafka -> ScoreSensorRecords -> Kafka, with offset commits after the writes (bundle finalizers)."""
    config = kafka_config(opts)
    records = pipeline | "ReadKafka" >> ReadFromKafkaPartitions(
        config, partitions, event_time_of=EventTimeReader(opts.wire_format), policy=watermark_policy(opts),
        fetch_max_wait_ms=opts.fetch_max_wait_ms)
    scoring = scoring_transform(opts, audit=bool(opts.audit_topic), in_process=in_process_streaming(pipeline.options),
                                in_read_order=reorders_keyed_input(pipeline.options))
    decoded, messages = records | "ScoreRecords" >> scoring
    topics = {SCORES: opts.score_topic, DEAD_LETTERS: opts.dead_letter_topic}
    if opts.audit_topic:
        topics[AUDIT] = opts.audit_topic
    if opts.shadow_model_dir:
        topics[SHADOW_SCORES] = opts.shadow_score_topic
    acknowledged = messages | "Write" >> WriteToKafka(config, topics)
    if calls_bundle_finalizers(pipeline.options):  # else run() commits the end offsets once the job has succeeded
        _ = acknowledged | "CommitOffsets" >> CommitOffsets(config, opts.consumer_group, partitions)
    write_drift(decoded, messages, pipeline.options, config)


def scoring_transform(opts: SensorScoringOptions, audit: bool = False, in_process: bool = False,
                      in_read_order: bool = False) -> ScoreSensorRecords:
    """The scoring path both modes run, configured from the options; audit records only to Kafka.

    `in_process`: streaming on the in-process runner (beam_jobs.pipelines.in_process_streaming).
    """
    return ScoreSensorRecords(
        rollout=rollout_config(opts), state_ttl_s=opts.state_ttl_s, max_batch_size=opts.max_batch_size,
        wire_format=opts.wire_format, inference_device=opts.inference_device,
        pseudonymize_key_env=opts.pseudonymize_key_env, audit=audit, policy=watermark_policy(opts),
        in_process_streaming=in_process, in_read_order=in_read_order,
    )


def build_file_pipeline(pipeline: beam.Pipeline, opts: SensorScoringOptions) -> None:
    """Recordings -> ScoreSensorRecords -> Avro files: file mode, the same scoring without a broker.

    Drift statistics will be written here as ``drift-*.avro`` (record
    ``schemas.serde.DRIFT``) with another WriteAvroFiles once the scoring
    path emits them; until then file mode writes no drift file.
    """
    records = pipeline | "ReadRecordings" >> ReadRecordingAsRecords(
        opts.input_files, opts.wire_format, watermark_policy(opts))
    _, messages = records | "ScoreRecords" >> scoring_transform(
        opts, in_read_order=reorders_keyed_input(pipeline.options))
    scores, dead_letters, shadow_scores = messages | "ByStream" >> beam.Partition(
        lambda m, _: STREAMS.index(m.stream), len(STREAMS))
    _ = scores | "WriteScores" >> WriteAvroFiles(f"{opts.output_dir}/scores", SCORE, opts.wire_format)
    _ = dead_letters | "WriteDeadLetters" >> WriteAvroFiles(
        f"{opts.output_dir}/dead-letters", DEAD_LETTER, opts.wire_format)
    if opts.shadow_model_dir:
        _ = shadow_scores | "WriteShadowScores" >> WriteAvroFiles(
            f"{opts.output_dir}/shadow-scores", SCORE, opts.wire_format)


def run_files(options: PipelineOptions) -> beam.runners.runner.PipelineResult:
    """File mode: --input_files scored into --output_dir, bounded, no Kafka."""
    opts = options.view_as(SensorScoringOptions)
    if not opts.output_dir:
        raise RecordingError("--input_files needs --output_dir, the folder the Avro outputs go to")
    rollout_config(opts).check()
    options.view_as(StandardOptions).streaming = False
    pipeline = new_pipeline(options)
    build_file_pipeline(pipeline, opts)
    _LOG.info("scoring %s into %s", opts.input_files, opts.output_dir)
    return run_to_end(pipeline)


def prepare(opts: SensorScoringOptions):
    """Checks the models and the broker before anything runs; returns the partitions to read."""
    rollout_config(opts).check()
    return prepare_topics(opts)


def prepare_topics(opts: SensorScoringOptions):
    """The broker part of `prepare`: the topics, created if missing, and the input partitions to read."""
    pseudonymizer_from_env(opts.pseudonymize_key_env)  # a missing key stops the launch, not the workers
    config = kafka_config(opts)
    topics = [opts.input_topic, opts.score_topic, opts.drift_topic, opts.retrain_topic, opts.dead_letter_topic]
    topics += [opts.audit_topic] if opts.audit_topic else []
    topics += [opts.shadow_score_topic] if opts.shadow_model_dir else []
    ensure_topics(config, topics,
                  partitions=opts.topic_partitions, timeout_s=opts.startup_timeout_s)
    partitions = resolve_partitions(config, opts.input_topic, opts.start_from, opts.consumer_group, opts.bounded)
    return select_partitions(partitions, opts.input_partitions)


def run(argv: list[str] | None = None) -> beam.runners.runner.PipelineResult:
    options = PipelineOptions(argv)
    opts = options.view_as(SensorScoringOptions)
    if opts.input_files or opts.output_dir:
        if not opts.input_files:
            raise RecordingError("--output_dir is for file mode: give the recordings with --input_files")
        return run_files(options)
    options.view_as(StandardOptions).streaming = not opts.bounded
    partitions = prepare(opts)
    _LOG.info("reading %s: %s", opts.input_topic,
              ", ".join(f"p{p.partition}@{p.start_offset}..{p.stop_offset or 'end'}" for p in partitions))
    pipeline = new_pipeline(options)
    build_pipeline(pipeline, opts, partitions)
    monitor = Monitor(opts.status_interval_s, opts.metrics_port).start()
    try:
        result = run_to_end(pipeline)
    finally:
        monitor.stop()
    if opts.bounded and result.state == PipelineState.DONE:
        committed = commit_finished_reads(kafka_config(opts), opts.consumer_group, partitions)
        if committed:
            _LOG.info("committed the end offsets the runner left uncommitted: %s", committed)
    return result


def _drain_on_signals() -> None:
    """SIGINT (Ctrl-C) or SIGTERM (docker stop, kill) drains the job; a second one stops it at once.

    Draining stops reading, lets the records in flight be scored, written and
    their offsets committed, then the pipeline ends. A stop at once (or a
    crash) loses nothing either: offsets not committed are read again by the
    next run with --start_from committed.
    """

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        _LOG.info("%s: draining (finishing in-flight records, committing); signal again to stop at once",
                  signal.Signals(signum).name)
        request_drain()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def launch(argv: list[str]) -> None:
    """The job's command: one pipeline, or with --local_processes N, N processes (beam_jobs/local_processes.py)."""
    options = PipelineOptions(argv)
    opts = options.view_as(SensorScoringOptions)
    if opts.local_processes <= 1 or opts.input_files or opts.output_dir:
        run(argv)
        return
    check_runner(options.view_as(StandardOptions).runner)
    # Only the broker is checked here: the scoring processes are forked before any torch work (LocalProcesses
    # says why), and each checks its models itself.
    merge = functools.partial(main, entry=drift_merge.run, doc=drift_merge.__doc__, prog=drift_merge.PROG)
    sys.exit(LocalProcesses(argv, opts, prepare_topics(opts), scoring_main=main, merge_main=merge).run())


def _configure_logging() -> None:
    label = os.environ.get(PROCESS_LABEL_ENV)
    where = f" [{label}]" if label else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s",
                        force=True)
    for noisy in ("kafka", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None, entry: Callable[[list[str]], object] = launch, doc: str = __doc__,
         prog: str = "python -m beam_jobs.sensor_scoring") -> None:
    """The command line of the job (and of beam_jobs.drift_merge, with its `entry`): logging, signals, exit codes."""
    _configure_logging()
    if argv is None:
        argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        help_parser(prog, doc).print_help()
        return
    _drain_on_signals()  # the launcher of --local_processes replaces these with its own
    try:
        entry(argv)
    except (BrokerUnavailable, ModelArtifactError, RolloutError, RecordingError, KafkaSecurityError,
            PseudonymizeKeyMissing, UnknownPartitions, LocalProcessesError) as e:
        _LOG.error("%s", e)
        sys.exit(2)
    except KeyboardInterrupt:
        _LOG.info("stopped")


if __name__ == "__main__":
    main()
