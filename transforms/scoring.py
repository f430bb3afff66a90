"""Batched scoring with RunInference, and the SensorScore records it yields."""

from __future__ import annotations

import time
from typing import Iterator

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult, RunInference

from models.artifact import cached_artifact
from models.handler import scoring_model_handler
from schemas.serde import SCORE, AvroEncoder
from transforms.dead_letters import dead_letter
from transforms.device_state import ScoringContext
from transforms.kafka_sink import OutgoingMessage
from transforms.offset_commits import SourcePosition

_METRICS = "scoring"
STAGE_INFERENCE = "inference"


def score_record(context: ScoringContext, output: list[float], features: tuple[str, ...], threshold: float,
                 model_version: str, processed_at: int) -> dict:
    """The SensorScore of one event from the head's [score, contributions...] row."""
    score = float(output[0])
    event = context.event
    return {
        "event_id": event.event_id,
        "device_id": event.device_id,
        "event_time": event.event_time,
        "score": score,
        "threshold": threshold,
        "is_anomaly": (not context.calibrating) and score > threshold,
        "model_version": model_version,
        "contributions": dict(zip(features, map(float, output[1:]))),
        "imputed": list(context.imputed),
        "processed_at": processed_at,
    }


class _ToScoreMessageFn(beam.DoFn):
    def __init__(self, model_dir: str, wire_format: str):
        self._model_dir = model_dir
        self._wire_format = wire_format
        self._anomalies = beam.metrics.Metrics.counter(_METRICS, "anomalies")
        self._scores = beam.metrics.Metrics.counter(_METRICS, "scores")

    def setup(self) -> None:
        artifact = cached_artifact(self._model_dir)
        self._features = artifact.features
        self._threshold = artifact.threshold
        self._version = artifact.version
        self._encode = AvroEncoder(SCORE, self._wire_format)

    def process(self, element: tuple[ScoringContext, PredictionResult]) -> Iterator[OutgoingMessage]:
        context, prediction = element
        record = score_record(context, prediction.inference.tolist(), self._features, self._threshold,
                              self._version, int(time.time() * 1000))
        self._scores.inc()
        if record["is_anomaly"]:
            self._anomalies.inc()
        event = context.event
        yield OutgoingMessage(event.device_id.encode(), self._encode(record), event.event_time, event.source)


def _inference_dead_letters(failure) -> Iterator[tuple[SourcePosition, dict]]:
    """One dead letter per event of a batch whose inference raised."""
    batch, (_, error, _) = failure
    for context, _ in batch:
        event = context.event
        yield dead_letter(event.source, event.key, event.value, f"inference failed: {error}", STAGE_INFERENCE)


class ScoreEvents(beam.PTransform):
    """(ScoringContext, model input) in; score messages and inference dead letters out."""

    def __init__(self, model_dir: str, *, max_batch_size: int, wire_format: str = "plain", device: str = "CPU"):
        super().__init__()
        self._model_dir = model_dir
        self._max_batch_size = max_batch_size
        self._wire_format = wire_format
        self._device = device

    def expand(self, inputs):
        handler = scoring_model_handler(
            cached_artifact(self._model_dir), max_batch_size=self._max_batch_size, device=self._device
        )
        predictions, failures = inputs | "RunInference" >> RunInference(handler).with_exception_handling()
        messages = predictions | "ToScoreMessage" >> beam.ParDo(_ToScoreMessageFn(self._model_dir, self._wire_format))
        dead = failures.failed_inferences | "InferenceDeadLetters" >> beam.FlatMap(_inference_dead_letters)
        return messages, dead
