"""Batched scoring with RunInference, and the SensorScore records it yields."""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.utils.windowed_value import WindowedValue

from models.handler import scoring_model_handler
from models.rollout import CANARY, PRIMARY, SHADOW
from schemas.serde import AUDIT as AUDIT_RECORD
from schemas.serde import DEAD_LETTER, SCORE, AvroEncoder
from transforms.audit import AUDIT, audit_record
from transforms.dead_letters import Rejected, dead_letter, dead_letter_message
from transforms.device_state import ScoringContext
from transforms.kafka_sink import SCORES, SHADOW_SCORES, OutgoingMessage
from transforms.live_stats import LIVE
from transforms.windowing import stamped

_METRICS = "scoring"
STAGE_INFERENCE = "inference"


def score_record(context: ScoringContext, output: list[float], processed_at: int) -> dict:
    """The SensorScore of one event from the head's [score, contributions...] row."""
    score = float(output[0])
    event, model = context.event, context.model
    return {
        "event_id": event.event_id,
        "device_id": event.device_id,
        "event_time": event.event_time,
        "score": score,
        "threshold": model.threshold,
        "is_anomaly": (not context.calibrating) and score > model.threshold,
        "model_version": model.version,
        "contributions": dict(zip(model.features, map(float, output[1:]))),
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
    Rows of models with different feature counts (a canary or shadow) are
    run as separate batches, since rows of one batch are stacked. Rows and
    results are numpy arrays (see models/handler.py).
    """

    def __init__(self, base: ModelHandler):
        super().__init__()
        self._base = base

    def load_model(self):
        return self._base.load_model()

    def run_inference(self, batch: Sequence[tuple[Any, Any]], model, inference_args=None) -> list[tuple[Any, Any]]:
        by_width: dict[int, list[int]] = {}
        for i, (_, example) in enumerate(batch):
            if example is not None:
                by_width.setdefault(example.shape[-1], []).append(i)
        results: list[tuple[Any, Any]] = list(batch)
        for scored in by_width.values():
            try:
                predictions = list(self._base.run_inference([batch[i] for i in scored], model, inference_args))
            except Exception as error:  # noqa: BLE001 - any model error becomes a dead letter
                predictions = [(batch[i][0], error) for i in scored]
            for i, prediction in zip(scored, predictions):
                results[i] = prediction
        return results

    def get_num_bytes(self, batch: Sequence[tuple[Any, Any]]) -> int:
        """Bytes of the model input rows (the base handler pickles the keys and walks each row element by element)."""
        return sum(example.nbytes for _, example in batch if example is not None)

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


class _ToMessagesFn(beam.DoFn):
    """RunInference's results to score messages, and dead letters for rejected or failed events.

    A shadow model's scores go to their own stream and touch nothing else:
    no audit record, no live anomaly rate, no dead letter when its inference
    fails (the deciding model's score answers for the record).
    """

    def __init__(self, wire_format: str, audit: bool = False):
        self._wire_format = wire_format
        self._audit = audit
        counter = beam.metrics.Metrics.counter
        self._anomalies = counter(_METRICS, "anomalies")
        self._scores = counter(_METRICS, "scores")
        self._failed = counter(_METRICS, "failed_inferences")
        self._by_role = {role: (counter(_METRICS, f"scores_{role}"), counter(_METRICS, f"anomalies_{role}"))
                         for role in (PRIMARY, CANARY, SHADOW)}
        self._shadow_failed = counter(_METRICS, "failed_inferences_shadow")

    def setup(self) -> None:
        self._encode_score = AvroEncoder(SCORE, self._wire_format)
        self._encode_dead_letter = AvroEncoder(DEAD_LETTER, self._wire_format)
        self._encode_audit = AvroEncoder(AUDIT_RECORD, self._wire_format) if self._audit else None

    def process(self, element: tuple[Any, Any]) -> Iterator[WindowedValue]:
        """Each message stamped with its own time: a score's is its event time.

        RunInference hands its batches on at the end of the global window, which
        holds no watermark back: downstream steps that window by event time
        (drift) would find their windows closed on runners that keep Beam's
        semantics. Stamped here, in the bundle of the events it answers for, a
        message holds the watermark at its event time until it is consumed.
        """
        key, result = element
        if isinstance(key, Rejected):  # riding the keyed stream (transforms/in_process_runner.py)
            messages = (dead_letter_message(key, self._encode_dead_letter),)
        elif isinstance(result, Exception):
            messages = self._failed_inference(key, result)
        else:
            messages = self._score_messages(key, result)
        for message in messages:
            yield stamped(message, message.timestamp_ms)

    def _failed_inference(self, context: ScoringContext, error: Exception) -> Iterator[OutgoingMessage]:
        if context.model.role == SHADOW:
            self._shadow_failed.inc()
            return
        self._failed.inc()
        event = context.event
        rejected = dead_letter(event.source, event.key, event.value, f"inference failed: {error!r}",
                               STAGE_INFERENCE)
        yield dead_letter_message(rejected, self._encode_dead_letter)

    def _score_messages(self, context: ScoringContext, prediction: PredictionResult) -> Iterator[OutgoingMessage]:
        """The score, and with auditing on, the audit record of an anomaly (see transforms/audit.py)."""
        record = score_record(context, prediction.inference.tolist(), int(time.time() * 1000))
        event, role = context.event, context.model.role
        scores, anomalies = self._by_role[role]
        scores.inc()
        if record["is_anomaly"]:
            anomalies.inc()
        stream = SHADOW_SCORES if role == SHADOW else SCORES
        yield OutgoingMessage(stream, event.device_id.encode(), self._encode_score(record), event.event_time,
                              event.source, event.watermark_ms)
        if role == SHADOW:
            return
        self._scores.inc()
        if record["is_anomaly"]:
            self._anomalies.inc()
        LIVE.scored(record["is_anomaly"])
        if record["is_anomaly"] and self._encode_audit:
            audit = self._encode_audit(audit_record(record, event.readings))
            yield OutgoingMessage(AUDIT, event.device_id.encode(), audit, event.event_time, None)


class ScoreEvents(beam.PTransform):
    """(ScoringContext, model input) and (Rejected, None) in; score and dead-letter messages out."""

    def __init__(self, *, max_batch_size: int, wire_format: str = "plain", device: str = "CPU", audit: bool = False):
        super().__init__()
        self._max_batch_size = max_batch_size
        self._wire_format = wire_format
        self._device = device
        self._audit = audit

    def expand(self, inputs: beam.PCollection) -> beam.PCollection[OutgoingMessage]:
        handler = scoring_model_handler(max_batch_size=self._max_batch_size, device=self._device)
        return (
            inputs
            | "RunInference" >> RunInference(PassThroughModelHandler(handler))
            | "ToMessages" >> beam.ParDo(_ToMessagesFn(self._wire_format, self._audit))
        )
