"""Drift statistics per event-time window, fleet-wide, and retrain triggers.

Valid events give one value per reading (None when the reading is missing);
score messages give the ``__score__`` value. Values are windowed into fixed
event-time windows and combined per feature into a
:class:`~transforms.drift_stats.WindowSummary` (bin counts and per-device
moments: bounded memory, exact merges). When the watermark passes a window's
end, each feature yields one DriftStatistics record (see ``drift_stats`` for
PSI, KS and the thresholds).

Retrain trigger: per feature. When one feature drifts in ``retrain_after``
consecutive windows (each starting where the last ended), one RetrainTrigger
is emitted; the run must break (a window without drift, or without data)
before that feature triggers again. Windows of one feature reach the trigger
step in order because the runner fires them as the watermark passes their
ends.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import FixedWindows, GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from models.drift_reference import SCORE_FEATURE, DriftReference
from schemas.serde import SCORE, AvroDecoder, AvroEncoder
from transforms.decode import ValidEvent
from transforms.drift_stats import DriftThresholds, WindowSummary, drift_statistics
from transforms.kafka_sink import OutgoingMessage
from transforms.offset_commits import SourcePosition

_METRICS = "drift"
# Drift records are derived from many inputs and acknowledge none of them: they never feed offset commits.
DERIVED = SourcePosition("", -1, -1, -1)

FeatureValue = Tuple[str, str, Optional[float]]  # (feature, device_id, value or None)


def _reading_values(event: ValidEvent, features: tuple[str, ...]) -> Iterator[tuple[str, FeatureValue]]:
    for feature in features:
        yield feature, (feature, event.device_id, event.readings.get(feature))


class _ScoreValueFn(beam.DoFn):
    """Score message -> (__score__, value), timestamped by the event time again.

    RunInference emits its batches at the end of the global window, so the
    score's own event time (the message timestamp) is restored here.
    """

    def __init__(self, wire_format: str):
        self._wire_format = wire_format

    def setup(self) -> None:
        self._decode = AvroDecoder(SCORE, self._wire_format)

    def process(self, message: OutgoingMessage) -> Iterator[TimestampedValue]:
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


class _PersistentDriftFn(beam.DoFn):
    """Keyed by feature: DriftStatistics in, a RetrainTrigger when a drift run reaches `retrain_after` windows."""

    RUN = ReadModifyWriteStateSpec("run", PickleCoder())

    def __init__(self, retrain_after: int):
        self._retrain_after = retrain_after
        self._triggers = beam.metrics.Metrics.counter(_METRICS, "retrain_triggers")

    def process(self, element: tuple[str, dict], run_state=beam.DoFn.StateParam(RUN)) -> Iterator[dict]:
        _, stats = element
        if not stats["drift"]:
            run_state.clear()
            return
        run: Optional[_Run] = run_state.read()
        if run is None or run.last_window_end != stats["window_start"]:
            run = _Run(stats["window_start"], stats["window_end"], 1)
        else:
            run = _Run(run.first_window_start, stats["window_end"], run.windows + 1)
        run_state.write(run)
        if run.windows == self._retrain_after:
            self._triggers.inc()
            yield {"feature": stats["feature"], "model_version": stats["model_version"],
                   "first_window_start": run.first_window_start, "last_window_end": run.last_window_end,
                   "consecutive_windows": run.windows, "psi": stats["psi"], "ks_pvalue": stats["ks_pvalue"]}


class ComputeDrift(beam.PTransform):
    """(valid events, score messages) in; (DriftStatistics, RetrainTrigger) record dicts out."""

    def __init__(self, reference: DriftReference, *, window_s: float, retrain_after_windows: int,
                 thresholds: DriftThresholds = DriftThresholds(), wire_format: str = "plain"):
        super().__init__()
        self._reference = reference
        self._window_s = window_s
        self._retrain_after = retrain_after_windows
        self._thresholds = thresholds
        self._wire_format = wire_format

    def expand(self, inputs):
        events, score_messages = inputs
        readings = tuple(f for f in self._reference.features if f != SCORE_FEATURE)
        reading_values = events | "ReadingValues" >> beam.FlatMap(_reading_values, readings)
        score_values = score_messages | "ScoreValues" >> beam.ParDo(_ScoreValueFn(self._wire_format))
        statistics = (
            (reading_values, score_values)
            | "AllValues" >> beam.Flatten()
            | "FixedWindows" >> beam.WindowInto(FixedWindows(self._window_s))
            | "Summarise" >> beam.CombinePerKey(_SummaryFn(self._reference))
            | "Statistics" >> beam.ParDo(_ToStatisticsFn(self._reference, self._thresholds))
        )
        triggers = (
            statistics
            | "KeyByFeature" >> beam.Map(lambda s: (s["feature"], s)).with_output_types(Tuple[str, Any])
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "PersistentDrift" >> beam.ParDo(_PersistentDriftFn(self._retrain_after))
        )
        return statistics, triggers


class _ToMessageFn(beam.DoFn):
    """A drift or retrain record -> an Avro message keyed by feature, stamped with the window end."""

    def __init__(self, name: str, wire_format: str):
        self._name = name
        self._wire_format = wire_format

    def setup(self) -> None:
        self._encode = AvroEncoder(self._name, self._wire_format)

    def process(self, record: dict) -> Iterator[OutgoingMessage]:
        end = record.get("window_end", record.get("last_window_end"))
        yield OutgoingMessage(record["feature"].encode(), self._encode(record), end, DERIVED)


class EncodeRecords(beam.PTransform):
    """Record dicts of schema `name` -> OutgoingMessages for WriteToKafka (their acks commit nothing)."""

    def __init__(self, name: str, wire_format: str = "plain"):
        super().__init__()
        self._name = name
        self._wire_format = wire_format

    def expand(self, records):
        return records | "Encode" >> beam.ParDo(_ToMessageFn(self._name, self._wire_format))
