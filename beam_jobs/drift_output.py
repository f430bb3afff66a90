"""The job's drift branch: DriftStatistics and RetrainTrigger records to their Kafka topics.

Kept apart from ``build_pipeline`` so the scoring path stays one chain; the
branch's sink acknowledgements are dropped: drift records answer for no
input offset, so they never hold back or advance offset commits. Windows
close as the watermark passes them, so records come out while the job runs
(transforms/drift.py; on the in-process runner, on the values' watermark
evidence: transforms/in_process_runner.py).
"""

from __future__ import annotations

import logging

import apache_beam as beam

from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.options import SensorScoringOptions, watermark_policy
from beam_jobs.pipelines import in_process_streaming
from models.artifact import load_artifact
from models.drift_reference import DriftReference, load_reference
from transforms.drift import DRIFT_STREAM, RETRAIN_STREAM, CloseDriftWindows, ComputeDrift, DriftPartials
from transforms.in_process_runner import CloseLiveDriftWindows
from transforms.drift_partials import DRIFT_PARTIALS_STREAM, PartialsToMessagesFn
from transforms.drift_stats import DriftThresholds
from transforms.kafka_client import KafkaConfig
from transforms.kafka_sink import WriteToKafka

_LOG = logging.getLogger("sensor_scoring")


def drift_reference(opts: SensorScoringOptions) -> DriftReference | None:
    """The model's reference, or None (with a warning) when the artifact has none: then no drift branch."""
    reference = load_reference(opts.model_dir)
    if reference is None:
        _LOG.warning("%s has no drift reference (python -m models.drift_reference writes one): "
                     "no drift statistics", opts.model_dir)
    elif reference.model_version != load_artifact(opts.model_dir).version:
        _LOG.warning("the drift reference in %s was built for model %s", opts.model_dir, reference.model_version)
    return reference


def _drift_options(opts: SensorScoringOptions) -> dict:
    return dict(window_s=opts.drift_window_s, retrain_after_windows=opts.retrain_after_windows,
                thresholds=DriftThresholds(psi=opts.drift_psi_threshold, ks_pvalue=opts.drift_ks_pvalue),
                wire_format=opts.wire_format, policy=watermark_policy(opts))


def _closing(options: PipelineOptions) -> type:
    """Beam windows, or the in-process runner's evidence in streaming (beam_jobs.pipelines decides)."""
    return CloseLiveDriftWindows if in_process_streaming(options) else CloseDriftWindows


def drift_closer(options: PipelineOptions, reference: DriftReference):
    """Closes drift windows as the options say."""
    return _closing(options)(reference, **_drift_options(options.view_as(SensorScoringOptions)))


def drift_topics(opts: SensorScoringOptions) -> dict[str, str]:
    return {DRIFT_STREAM: opts.drift_topic, RETRAIN_STREAM: opts.retrain_topic}


def write_drift(decoded: beam.PCollection, messages: beam.PCollection, options: PipelineOptions,
                config: KafkaConfig) -> None:
    """Adds the drift branch: decoded events and scoring messages in, drift and retrain topics out.

    With --drift_partials_topic (a scoring process of --local_processes) the
    branch writes its partial summaries there instead, for the drift merger.
    """
    opts = options.view_as(SensorScoringOptions)
    reference = drift_reference(opts)
    if reference is None:
        return
    if opts.drift_partials_topic:
        branches = (decoded, messages) | "DriftPartials" >> DriftPartials(
            reference, window_s=opts.drift_window_s, wire_format=opts.wire_format, policy=watermark_policy(opts))
        for name, partials in zip(("Readings", "Scores"), branches):
            _ = (partials
                 | f"{name}PartialMessages" >> beam.ParDo(PartialsToMessagesFn(opts.wire_format))
                 | f"Write{name}Partials" >> WriteToKafka(config, {DRIFT_PARTIALS_STREAM: opts.drift_partials_topic}))
        return
    branches = (decoded, messages) | "Drift" >> ComputeDrift(reference, **_drift_options(opts),
                                                            close=_closing(options))
    for name, branch in zip(("Readings", "Scores"), branches):
        _ = branch | f"Write{name}Drift" >> WriteToKafka(config, drift_topics(opts))
