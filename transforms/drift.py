"""Drift statistics per event-time window, fleet-wide, and retrain triggers.

Valid events of the scoring path's decode step give one value per reading
(None when the reading is missing), with device ids already pseudonymised
where the job does that; score messages give the ``__score__`` value. Values are grouped into
fixed event-time windows per feature as a
:class:`~transforms.drift_stats.WindowSummary` (bin counts and per-device
moments: bounded memory, exact merges). The value steps already summarise
each bundle's values per feature, window and partition and send those
partial summaries on, not one element per value (transforms/drift_partials.py).
When a window closes, each feature yields one DriftStatistics record (see
``drift_stats`` for PSI, KS and the thresholds).

Windows close as Beam closes them: the partials go into FixedWindows and a
CombinePerKey, which the runner fires once the watermark passes the window's
end plus the allowed lateness (the partials are stamped that much later, in
windows offset by as much, so the one on-time pane holds every value that
is not late). Streaming on the in-process runner, which holds a combine's
output back until the end of time, closes them on the values' watermark
evidence instead (transforms/in_process_runner.py).

Late events (transforms/event_time.py: behind their partition's watermark
by more than the allowed lateness) are scored but left out of drift on both
paths, and counted (``drift/late_values``): which events are late depends on
the order of each partition's records only, so bounded and streaming runs,
and replays at any speed from the recorded pace up, give the same windows.
An on-time value can never find its window closed.

Retrain trigger: per reading. When one reading drifts in ``retrain_after``
consecutive windows (each starting where the last ended), one RetrainTrigger
is emitted; the run must break (a window without drift, or without data)
before that feature triggers again. Windows of one feature reach the trigger
step in order: the runner fires them as the watermark passes their ends. ``__score__`` drift is reported but
triggers nothing: retraining answers input drift, and the score distribution
also moves while devices warm up after a job start (their first windows score
below the training reference, measured in tests/test_drift_job.py).
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import FixedWindows, GlobalWindows, TimestampedValue

from models.drift_reference import SCORE_FEATURE, DriftReference
from schemas.serde import DRIFT, RETRAIN, AvroEncoder, ScoreHeadReader
from transforms.decode import DeviceEvents
from transforms.drift_partials import PartialSummaries, PartialSummary
from transforms.drift_stats import DriftThresholds, WindowSummary, drift_statistics, load_scipy_stats
from transforms.event_time import WatermarkPolicy
from transforms.kafka_sink import SCORES, OutgoingMessage
from transforms.offset_commits import partition_key
from transforms.state_cache import skip_module_globals_scan

_METRICS = "drift"
NO_EVIDENCE = -(2**63)
DRIFT_STREAM = "drift"
RETRAIN_STREAM = "retrain"


class _ReadingValuesFn(beam.DoFn):
    """(key, DeviceEvents | Rejected) -> (feature, PartialSummary) per reference reading, window and partition.

    It reads DecodeEvents' output, so events are decoded and validated once;
    rejected records are the scoring path's to report. The evidence of a
    reading is its record's source watermark; late events are left out.
    """

    def __init__(self, features: tuple[str, ...], reference: DriftReference, window_ms: int,
                 policy: WatermarkPolicy):
        self._features = features
        self._reference = reference
        self._window_ms = window_ms
        self._policy = policy
        self._late = beam.metrics.Metrics.counter(_METRICS, "late_values")

    def start_bundle(self) -> None:
        self._partials = PartialSummaries(self._reference, self._window_ms, self._features)

    def process(self, element: tuple[str, Any]) -> None:
        _, device_events = element
        if not isinstance(device_events, DeviceEvents):
            return
        for event in device_events.events:
            if self._policy.is_late(event.event_time, event.watermark_ms):
                self._late.inc(len(self._features))
                continue
            partition = partition_key(event.source.topic, event.source.partition)
            self._partials.add(event.event_time, partition, _evidence(event.watermark_ms), event.device_id,
                               event.readings)

    def finish_bundle(self):
        yield from self._partials.emit()


class _ScoreValueFn(beam.DoFn):
    """Score messages -> (__score__, PartialSummary) per window and partition; other messages pass by.

    RunInference emits its batches at the end of the global window, so the
    score's event time (the message timestamp) picks the window; the
    watermark its event was read with is the live evidence, and says whether
    it is late.
    """

    def __init__(self, wire_format: str, reference: DriftReference, window_ms: int, policy: WatermarkPolicy):
        self._wire_format = wire_format
        self._reference = reference
        self._window_ms = window_ms
        self._policy = policy
        self._late = beam.metrics.Metrics.counter(_METRICS, "late_values")

    def setup(self) -> None:
        self._read = ScoreHeadReader(self._wire_format)  # the job's own score bytes: device_id and score only

    def start_bundle(self) -> None:
        self._partials = PartialSummaries(self._reference, self._window_ms, (SCORE_FEATURE,))

    def process(self, message: OutgoingMessage) -> None:
        if message.stream != SCORES:
            return
        if self._policy.is_late(message.timestamp_ms, message.watermark_ms):
            self._late.inc()
            return
        device_id, score = self._read(message.value)
        partition = partition_key(message.source.topic, message.source.partition)
        self._partials.add(message.timestamp_ms, partition, _evidence(message.watermark_ms), device_id,
                           {SCORE_FEATURE: score})

    def finish_bundle(self):
        yield from self._partials.emit()


def _evidence(watermark_ms: Optional[int]) -> int:
    return NO_EVIDENCE if watermark_ms is None else watermark_ms


def merged_summary(reference: DriftReference, feature: str, summary: Optional[WindowSummary],
            partial: PartialSummary) -> WindowSummary:
    """`summary` (a new one when None) with the partial's values added; the partial is left as it was."""
    summary = summary or WindowSummary.empty(reference.features[feature])
    return summary.merge(partial.summary)


class _SummaryFn(beam.CombineFn):
    """PartialSummaries of one feature and window -> WindowSummary (None while empty)."""

    def __init__(self, reference: DriftReference):
        self._reference = reference

    def create_accumulator(self) -> Optional[WindowSummary]:
        return None

    def add_input(self, summary: Optional[WindowSummary], partial: PartialSummary) -> WindowSummary:
        return merged_summary(self._reference, partial.feature, summary, partial)

    def merge_accumulators(self, summaries) -> Optional[WindowSummary]:
        merged = None
        for summary in summaries:
            if summary is not None:
                merged = summary if merged is None else merged.merge(summary)
        return merged

    def extract_output(self, summary: Optional[WindowSummary]) -> Optional[WindowSummary]:
        return summary


class DriftRun(NamedTuple):
    first_window_start: int
    last_window_end: int
    windows: int


def extend_run(run: Optional[DriftRun], stats: dict) -> Optional[DriftRun]:
    """The drift run this window continues or starts; None when it does not drift."""
    if not stats["drift"]:
        return None
    if run is None or run.last_window_end != stats["window_start"]:
        return DriftRun(stats["window_start"], stats["window_end"], 1)
    return DriftRun(run.first_window_start, stats["window_end"], run.windows + 1)


class DriftRecords:
    """Statistics records and their messages, for both paths: one record format, one trigger rule, one set of metrics."""

    def __init__(self, reference: DriftReference, thresholds: DriftThresholds, retrain_after: int, wire_format: str):
        self._reference = reference
        self._thresholds = thresholds
        self._retrain_after = retrain_after
        self._wire_format = wire_format
        counter = beam.metrics.Metrics.counter
        self._windows = counter(_METRICS, "feature_windows")
        self._drifted = counter(_METRICS, "feature_windows_drifted")
        self._triggers = counter(_METRICS, "retrain_triggers")

    def setup(self) -> None:
        """Encoders are built on the worker (they are not picklable); scipy is loaded before any bundle."""
        self._encode_drift = AvroEncoder(DRIFT, self._wire_format)
        self._encode_retrain = AvroEncoder(RETRAIN, self._wire_format)
        load_scipy_stats()

    def statistics(self, feature: str, start_ms: int, end_ms: int, summary: WindowSummary) -> dict:
        """The DriftStatistics record of one feature's window, counted."""
        record = {
            "window_start": start_ms,
            "window_end": end_ms,
            "feature": feature,
            **drift_statistics(summary, self._reference.features[feature], self._thresholds),
            "model_version": self._reference.model_version,
        }
        self._windows.inc()
        if record["drift"]:
            self._drifted.inc()
        return record

    def messages(self, stats: dict, run: Optional[DriftRun]) -> Iterator[OutgoingMessage]:
        """The record's message, and a RetrainTrigger's when `run` (this window's drift run) just got long enough."""
        key = stats["feature"].encode()
        yield OutgoingMessage(DRIFT_STREAM, key, self._encode_drift(stats), stats["window_end"], None)
        if self._retrain_after and stats["feature"] != SCORE_FEATURE and run is not None \
                and run.windows == self._retrain_after:
            self._triggers.inc()
            trigger = {"feature": stats["feature"], "model_version": stats["model_version"],
                       "first_window_start": run.first_window_start, "last_window_end": run.last_window_end,
                       "consecutive_windows": run.windows, "psi": stats["psi"], "ks_pvalue": stats["ks_pvalue"]}
            yield OutgoingMessage(RETRAIN_STREAM, key, self._encode_retrain(trigger), run.last_window_end, None)


class _ToStatisticsFn(beam.DoFn):
    """(feature, WindowSummary) of one window -> DriftStatistics record; windows are offset by the allowed lateness."""

    def __init__(self, records: DriftRecords, allowed_lateness_ms: int):
        self._records = records
        self._allowed_lateness_ms = allowed_lateness_ms

    def process(self, element: tuple[str, Optional[WindowSummary]], window=beam.DoFn.WindowParam) -> Iterator[dict]:
        feature, summary = element
        if summary is not None:
            start = window.start.micros // 1000 - self._allowed_lateness_ms
            end = window.end.micros // 1000 - self._allowed_lateness_ms
            yield self._records.statistics(feature, start, end, summary)


class _DriftMessagesFn(beam.DoFn):
    """Keyed by feature: DriftStatistics in; its message out, and a RetrainTrigger's when a drift run is long enough."""

    RUN = ReadModifyWriteStateSpec("run", PickleCoder())

    def __init__(self, records: DriftRecords):
        self._records = records

    def setup(self) -> None:
        skip_module_globals_scan()
        self._records.setup()

    def process(self, element: tuple[str, dict], run_state=beam.DoFn.StateParam(RUN)) -> Iterator[OutgoingMessage]:
        _, stats = element
        run = extend_run(run_state.read(), stats)
        if run is None:
            run_state.clear()
        else:
            run_state.write(run)
        yield from self._records.messages(stats, run)


def _by_feature(stats: dict) -> tuple[str, dict]:
    return stats["feature"], stats


class DriftPartials(beam.PTransform):
    """(DecodeEvents' output, scoring OutgoingMessages) in; (readings', scores') (feature, PartialSummary) out."""

    def __init__(self, reference: DriftReference, *, window_s: float, wire_format: str = "plain",
                 policy: WatermarkPolicy = WatermarkPolicy()):
        super().__init__()
        self._reference = reference
        self._readings = tuple(f for f in reference.features if f != SCORE_FEATURE)
        self._window_ms = int(window_s * 1000)
        self._wire_format = wire_format
        self._policy = policy

    def expand(self, inputs):
        decoded, messages = inputs
        readings = decoded | "ReadingValues" >> beam.ParDo(
            _ReadingValuesFn(self._readings, self._reference, self._window_ms, self._policy))
        scores = messages | "ScoreValues" >> beam.ParDo(
            _ScoreValueFn(self._wire_format, self._reference, self._window_ms, self._policy))
        return readings, scores


class CloseDriftWindows(beam.PTransform):
    """(feature, PartialSummary) in; drift and retrain OutgoingMessages out, as Beam closes the windows.

    A partial is stamped at its window's start plus the allowed lateness and
    windowed by FixedWindows offset as much, so its window fires once the
    watermark has passed the drift window's end plus the allowed lateness:
    one pane, with every value that is not late. ``__score__`` windows never
    trigger retraining.
    """

    def __init__(self, reference: DriftReference, *, window_s: float, retrain_after_windows: int,
                 thresholds: DriftThresholds = DriftThresholds(), wire_format: str = "plain",
                 policy: WatermarkPolicy = WatermarkPolicy()):
        super().__init__()
        self._reference = reference
        self._window_s = window_s
        self._records = DriftRecords(reference, thresholds, retrain_after_windows, wire_format)
        self._lateness_ms = policy.allowed_lateness_ms

    def expand(self, partials):
        lateness_ms = self._lateness_ms
        offset_s = (lateness_ms / 1000) % self._window_s
        return (
            partials
            | "AfterLateness" >> beam.Map(lambda kv: TimestampedValue(kv, (kv[1].window_start + lateness_ms) / 1000))
            | "FixedWindows" >> beam.WindowInto(FixedWindows(self._window_s, offset=offset_s))
            | "Summarise" >> beam.CombinePerKey(_SummaryFn(self._reference))
            | "Statistics" >> beam.ParDo(_ToStatisticsFn(self._records, lateness_ms))
            | "KeyByFeature" >> beam.Map(_by_feature).with_output_types(Tuple[str, Any])
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "ToMessages" >> beam.ParDo(_DriftMessagesFn(self._records))
        )


class ComputeDrift(beam.PTransform):
    """(DecodeEvents' output, scoring OutgoingMessages) in; (readings', scores') drift and retrain messages out.

    Two branches, each ending in its own sink. `close` is how windows close:
    CloseDriftWindows, or for streaming on the in-process runner
    ``in_process_runner.CloseLiveDriftWindows``, which takes the same arguments.
    """

    def __init__(self, reference: DriftReference, *, window_s: float, retrain_after_windows: int,
                 thresholds: DriftThresholds = DriftThresholds(), wire_format: str = "plain",
                 policy: WatermarkPolicy = WatermarkPolicy(), close: type[beam.PTransform] = CloseDriftWindows):
        super().__init__()
        self._partials = DriftPartials(reference, window_s=window_s, wire_format=wire_format, policy=policy)
        self._close = close
        self._close_args = dict(reference=reference, window_s=window_s, retrain_after_windows=retrain_after_windows,
                                thresholds=thresholds, wire_format=wire_format, policy=policy)

    def expand(self, inputs):
        readings, scores = inputs | "Partials" >> self._partials
        return (readings | "ReadingDrift" >> self._close(**self._close_args),
                scores | "ScoreDrift" >> self._close(**self._close_args))
