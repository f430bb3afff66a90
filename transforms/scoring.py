"""Batched scoring with RunInference, and the SensorScore records it yields."""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from models.artifact import cached_artifact
from models.handler import scoring_model_handler
from schemas.serde import AUDIT as AUDIT_RECORD
from schemas.serde import DEAD_LETTER, SCORE, AvroEncoder
from transforms.audit import AUDIT, audit_record
from transforms.dead_letters import Rejected, dead_letter, dead_letter_message
from transforms.device_state import ScoringContext
from transforms.kafka_sink import SCORES, OutgoingMessage
from transforms.live_stats import LIVE

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


class PassThroughModelHandler(ModelHandler):
    """Runs a keyed handler on (key, tensor) elements and lets (key, None) elements through.

    Rejected records share the stream to the one sink (see
    transforms/dead_letters.py), so they ride through RunInference as
    (Rejected, None). A batch whose inference raises comes back as
    (key, exception) for each of its events instead of failing the bundle:
    a failure output of its own would need a Flatten to reach the sink.

    Rows come in and results go out as numpy arrays (tensors are accepted
    too; see models.handler.rows_inference_fn): the runner samples elements
    and pickles them to estimate their size, and a tensor pickles through
    torch.save, or with the whole batch's storage for a row of the batch
    output.
    """

    def __init__(self, base: ModelHandler):
        super().__init__()
        self._base = base

    def load_model(self):
        return self._base.load_model()

    def run_inference(self, batch: Sequence[tuple[Any, Any]], model, inference_args=None) -> list[tuple[Any, Any]]:
        scored = [i for i, (_, example) in enumerate(batch) if example is not None]
        results: list[tuple[Any, Any]] = list(batch)
        if not scored:
            return results
        try:
            predictions = list(self._base.run_inference([batch[i] for i in scored], model, inference_args))
        except Exception as error:  # noqa: BLE001 - any model error becomes a dead letter
            predictions = [(batch[i][0], error) for i in scored]
        for i, prediction in zip(scored, predictions):
            results[i] = _as_numpy(prediction)
        return results

    def get_num_bytes(self, batch: Sequence[tuple[Any, Any]]) -> int:
        """Bytes of the model input rows (the base handler pickles the keys and walks each row element by element)."""
        return sum(example.nbytes if isinstance(example, np.ndarray) else example.element_size() * example.nelement()
                   for _, example in batch if example is not None)

    def get_metrics_namespace(self) -> str:
        return self._base.get_metrics_namespace()

    def batch_elements_kwargs(self):
        return self._base.batch_elements_kwargs()

    def share_model_across_processes(self) -> bool:
        return self._base.share_model_across_processes()

    def model_copies(self) -> int:
        return self._base.model_copies()

    def update_model_path(self, model_path=None):
        return self._base.update_model_path(model_path=model_path)


def _as_numpy(prediction: tuple[Any, Any]) -> tuple[Any, Any]:
    """(key, PredictionResult) with numpy example and inference; anything else as it is."""
    key, result = prediction
    if isinstance(result, PredictionResult) and isinstance(result.inference, torch.Tensor):
        example = result.example.cpu().numpy() if isinstance(result.example, torch.Tensor) else result.example
        # the constructor, not _replace: that costs a keyword parse and a _make per event
        result = PredictionResult(example, result.inference.detach().cpu().numpy(), result.model_id)
    return key, result


class _ToMessagesFn(beam.DoFn):
    """RunInference's results to score messages, and dead letters for rejected or failed events."""

    def __init__(self, model_dir: str, wire_format: str, audit: bool = False):
        self._model_dir = model_dir
        self._wire_format = wire_format
        self._audit = audit
        self._anomalies = beam.metrics.Metrics.counter(_METRICS, "anomalies")
        self._scores = beam.metrics.Metrics.counter(_METRICS, "scores")
        self._failed = beam.metrics.Metrics.counter(_METRICS, "failed_inferences")

    def setup(self) -> None:
        artifact = cached_artifact(self._model_dir)
        self._features = artifact.features
        self._threshold = artifact.threshold
        self._version = artifact.version
        self._encode_score = AvroEncoder(SCORE, self._wire_format)
        self._encode_dead_letter = AvroEncoder(DEAD_LETTER, self._wire_format)
        self._encode_audit = AvroEncoder(AUDIT_RECORD, self._wire_format) if self._audit else None

    def process(self, element: tuple[Any, Any]) -> Iterator[OutgoingMessage]:
        key, result = element
        if isinstance(key, Rejected):
            yield dead_letter_message(key, self._encode_dead_letter)
        elif isinstance(result, Exception):
            self._failed.inc()
            event = key.event
            rejected = dead_letter(event.source, event.key, event.value, f"inference failed: {result!r}",
                                   STAGE_INFERENCE)
            yield dead_letter_message(rejected, self._encode_dead_letter)
        else:
            yield from self._score_messages(key, result)

    def _score_messages(self, context: ScoringContext, prediction: PredictionResult) -> Iterator[OutgoingMessage]:
        """The score, and with auditing on, the audit record of an anomaly (see transforms/audit.py)."""
        record = score_record(context, prediction.inference.tolist(), self._features, self._threshold,
                              self._version, int(time.time() * 1000))
        self._scores.inc()
        if record["is_anomaly"]:
            self._anomalies.inc()
        LIVE.scored(record["is_anomaly"])
        event = context.event
        yield OutgoingMessage(SCORES, event.device_id.encode(), self._encode_score(record), event.event_time,
                              event.source)
        if record["is_anomaly"] and self._encode_audit:
            audit = self._encode_audit(audit_record(record, event.readings))
            yield OutgoingMessage(AUDIT, event.device_id.encode(), audit, event.event_time, None)


class ScoreEvents(beam.PTransform):
    """(ScoringContext, model input) and (Rejected, None) in; score and dead-letter messages out."""

    def __init__(self, model_dir: str, *, max_batch_size: int, wire_format: str = "plain", device: str = "CPU",
                 audit: bool = False):
        super().__init__()
        self._model_dir = model_dir
        self._max_batch_size = max_batch_size
        self._wire_format = wire_format
        self._device = device
        self._audit = audit

    def expand(self, inputs: beam.PCollection) -> beam.PCollection[OutgoingMessage]:
        handler = scoring_model_handler(
            cached_artifact(self._model_dir), max_batch_size=self._max_batch_size, device=self._device
        )
        return (
            inputs
            | "RunInference" >> RunInference(PassThroughModelHandler(handler))
            | "ToMessages" >> beam.ParDo(_ToMessagesFn(self._model_dir, self._wire_format, self._audit))
        )
