"""Drift statistics per event-time window, fleet-wide, and retrain triggers.

Valid input events give one value per reading (None when the reading is
missing; the records are decoded again here, so the scoring path stays one
chain); score messages give the ``__score__`` value. Values are windowed into fixed
event-time windows and combined per feature into a
:class:`~transforms.drift_stats.WindowSummary` (bin counts and per-device
moments: bounded memory, exact merges). When the watermark passes a window's
end, each feature yields one DriftStatistics record (see ``drift_stats`` for
PSI, KS and the thresholds).

Retrain trigger: per reading. When one reading drifts in ``retrain_after``
consecutive windows (each starting where the last ended), one RetrainTrigger
is emitted; the run must break (a window without drift, or without data)
before that feature triggers again. Windows of one feature reach the trigger
step in order because the runner fires them as the watermark passes their
ends. ``__score__`` drift is reported but triggers nothing: retraining
answers input drift, and the score distribution also moves while devices
warm up after a job start (their first windows score below the training
reference, measured in tests/test_drift_job.py).
"""

from __future__ import annotations

import time
from typing import Any, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import FixedWindows, GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from models.drift_reference import SCORE_FEATURE, DriftReference
from schemas.serde import DRIFT, EVENT, RETRAIN, SCORE, AvroDecoder, AvroEncoder, SerdeError
from transforms.decode import ValidationRules, validation_error
from transforms.drift_stats import DriftThresholds, WindowSummary, drift_statistics
from transforms.kafka_sink import SCORES, OutgoingMessage
from transforms.kafka_source import KafkaRecord

_METRICS = "drift"
FeatureValue = Tuple[str, str, Optional[float]]  # (feature, device_id, value or None)
DRIFT_STREAM = "drift"
RETRAIN_STREAM = "retrain"


class _ReadingValuesFn(beam.DoFn):
    """KafkaRecord -> one (feature, FeatureValue) per reference reading of a valid event, at its event time.

    It decodes and validates with the scoring path's own decoder and rules
    but counts nothing: rejected records are the scoring path's to report.
    """

    def __init__(self, features: tuple[str, ...], wire_format: str, rules: ValidationRules):
        self._features = features
        self._wire_format = wire_format
        self._rules = rules

    def setup(self) -> None:
        self._decode = AvroDecoder(EVENT, self._wire_format)

    def process(self, record: KafkaRecord) -> Iterator[TimestampedValue]:
        try:
            event = self._decode(record.value)
        except SerdeError:
            return
        if validation_error(event, self._rules, int(time.time() * 1000)):
            return
        timestamp = Timestamp.of(event["event_time"] / 1000)
        for feature in self._features:
            value = (feature, event["device_id"], event["readings"].get(feature))
            yield TimestampedValue((feature, value), timestamp)


class _ScoreValueFn(beam.DoFn):
    """Score message -> (__score__, FeatureValue) at the score's event time.

    RunInference emits its batches at the end of the global window, so the
    event time (the message timestamp) is restored here. Dead letters pass by.
    """

    def __init__(self, wire_format: str):
        self._wire_format = wire_format

    def setup(self) -> None:
        self._decode = AvroDecoder(SCORE, self._wire_format)

    def process(self, message: OutgoingMessage) -> Iterator[TimestampedValue]:
        if message.stream != SCORES:
            return
        score = self._decode(message.value)
        value = (SCORE_FEATURE, score["device_id"], score["score"])
        yield TimestampedValue((SCORE_FEATURE, value), Timestamp.of(message.timestamp_ms / 1000))


class _SummaryFn(beam.CombineFn):
    """FeatureValues of one feature and window -> WindowSummary (None while empty)."""

    def __init__(self, reference: DriftReference):
        self._reference = reference

    def create_accumulator(self) -> Optional[WindowSummary]:
        return None

    def add_input(self, summary: Optional[WindowSummary], element: FeatureValue) -> WindowSummary:
        feature, device_id, value = element
        reference = self._reference.features[feature]
        summary = summary or WindowSummary.empty(reference)
        summary.add(reference, device_id, value)
        return summary

    def merge_accumulators(self, summaries) -> Optional[WindowSummary]:
        merged = None
        for summary in summaries:
            if summary is not None:
                merged = summary if merged is None else merged.merge(summary)
        return merged

    def extract_output(self, summary: Optional[WindowSummary]) -> Optional[WindowSummary]:
        return summary


class _ToStatisticsFn(beam.DoFn):
    """(feature, WindowSummary) of one window -> DriftStatistics record."""

    def __init__(self, reference: DriftReference, thresholds: DriftThresholds):
        self._reference = reference
        self._thresholds = thresholds
        self._windows = beam.metrics.Metrics.counter(_METRICS, "feature_windows")
        self._drifted = beam.metrics.Metrics.counter(_METRICS, "feature_windows_drifted")

    def process(self, element: tuple[str, Optional[WindowSummary]], window=beam.DoFn.WindowParam) -> Iterator[dict]:
        feature, summary = element
        if summary is None:
            return
        record = {
            "window_start": window.start.micros // 1000,
            "window_end": window.end.micros // 1000,
            "feature": feature,
            **drift_statistics(summary, self._reference.features[feature], self._thresholds),
            "model_version": self._reference.model_version,
        }
        self._windows.inc()
        if record["drift"]:
            self._drifted.inc()
        yield record


class _Run(NamedTuple):
    first_window_start: int
    last_window_end: int
    windows: int


class _DriftMessagesFn(beam.DoFn):
    """Keyed by feature: DriftStatistics in; its message out, and a RetrainTrigger's when a drift run is long enough."""

    RUN = ReadModifyWriteStateSpec("run", PickleCoder())

    def __init__(self, retrain_after: int, wire_format: str):
        self._retrain_after = retrain_after
        self._wire_format = wire_format
        self._triggers = beam.metrics.Metrics.counter(_METRICS, "retrain_triggers")

    def setup(self) -> None:
        self._encode_drift = AvroEncoder(DRIFT, self._wire_format)
        self._encode_retrain = AvroEncoder(RETRAIN, self._wire_format)

    def process(self, element: tuple[str, dict], run_state=beam.DoFn.StateParam(RUN)) -> Iterator[OutgoingMessage]:
        feature, stats = element
        key = feature.encode()
        yield OutgoingMessage(DRIFT_STREAM, key, self._encode_drift(stats), stats["window_end"], None)
        run = self._extend(run_state.read(), stats)
        if run is None:
            run_state.clear()
            return
        run_state.write(run)
        if self._retrain_after and run.windows == self._retrain_after:
            self._triggers.inc()
            trigger = {"feature": feature, "model_version": stats["model_version"],
                       "first_window_start": run.first_window_start, "last_window_end": run.last_window_end,
                       "consecutive_windows": run.windows, "psi": stats["psi"], "ks_pvalue": stats["ks_pvalue"]}
            yield OutgoingMessage(RETRAIN_STREAM, key, self._encode_retrain(trigger), run.last_window_end, None)

    @staticmethod
    def _extend(run: Optional[_Run], stats: dict) -> Optional[_Run]:
        """The drift run this window continues or starts; None when it does not drift."""
        if not stats["drift"]:
            return None
        if run is None or run.last_window_end != stats["window_start"]:
            return _Run(stats["window_start"], stats["window_end"], 1)
        return _Run(run.first_window_start, stats["window_end"], run.windows + 1)


def _by_feature(stats: dict) -> tuple[str, dict]:
    return stats["feature"], stats


class _WindowedDrift(beam.PTransform):
    """(feature, FeatureValue) at event times -> drift and retrain OutgoingMessages."""

    def __init__(self, reference: DriftReference, window_s: float, retrain_after: int, thresholds: DriftThresholds,
                 wire_format: str):
        super().__init__()
        self._reference = reference
        self._window_s = window_s
        self._retrain_after = retrain_after
        self._thresholds = thresholds
        self._wire_format = wire_format

    def expand(self, values):
        return (
            values
            | "FixedWindows" >> beam.WindowInto(FixedWindows(self._window_s))
            | "Summarise" >> beam.CombinePerKey(_SummaryFn(self._reference))
            | "Statistics" >> beam.ParDo(_ToStatisticsFn(self._reference, self._thresholds))
            | "KeyByFeature" >> beam.Map(_by_feature).with_output_types(Tuple[str, Any])
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "ToMessages" >> beam.ParDo(_DriftMessagesFn(self._retrain_after, self._wire_format))
        )


class ComputeDrift(beam.PTransform):
    """(input KafkaRecords, scoring OutgoingMessages) in; (readings', scores') drift and retrain messages out.

    Two branches and no Flatten: each ends in its own sink (see
    transforms/kafka_sink.py on Flatten in the in-process runner).
    """

    def __init__(self, reference: DriftReference, *, window_s: float, retrain_after_windows: int,
                 thresholds: DriftThresholds = DriftThresholds(), wire_format: str = "plain",
                 rules: ValidationRules = ValidationRules()):
        super().__init__()
        self._reference = reference
        self._readings = tuple(f for f in reference.features if f != SCORE_FEATURE)
        self._wire_format = wire_format
        self._rules = rules
        self._windowed = (reference, window_s, retrain_after_windows, thresholds, wire_format)

    def expand(self, inputs):
        records, messages = inputs
        readings = (
            records
            | "ReadingValues" >> beam.ParDo(_ReadingValuesFn(self._readings, self._wire_format, self._rules))
            | "ReadingDrift" >> _WindowedDrift(*self._windowed)
        )
        scores = (
            messages
            | "ScoreValues" >> beam.ParDo(_ScoreValueFn(self._wire_format))
            | "ScoreDrift" >> _WindowedDrift(*self._windowed[:2], 0, *self._windowed[3:])
        )
        return readings, scores
