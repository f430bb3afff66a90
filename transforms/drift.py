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

Two ways to close a window, chosen by ``live``:

* Bounded runs (``live=False``) and TestStream: Beam windowing. Values go into
  FixedWindows and a CombinePerKey; the runner fires each window as its
  watermark passes the window end.
* Streaming (``live=True``): the in-process FnApiRunner schedules a stage
  behind a GroupByKey, Combine or Flatten only when its input watermark
  reaches the end of time, so windowed combines emit nothing while a job
  runs, and it fires event-time timers early (a timer 60 s ahead fired after
  about 2 s). So a stateful DoFn keyed by feature, fed straight by the stage
  before it and with no timer, keeps the open windows and closes them on
  *evidence* carried by the values: per partition, the event-time watermark
  its latest record was read with (scores carry their event's). The
  fleet-wide evidence is the minimum over the partitions seen. A partition's
  evidence counts only from the next bundle on: within a bundle, the
  per-device shuffle of the scoring path reorders values, and a later bundle
  holds none of an earlier one's. A window closes once every partition seen
  has carried its watermark past the window's end plus the allowed lateness;
  a partition that goes silent holds the windows open until it sends again.

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
step in order: the runner fires them as the watermark passes their ends, and
the live DoFn closes them in order. ``__score__`` drift is reported but
triggers nothing: retraining answers input drift, and the score distribution
also moves while devices warm up after a job start (their first windows score
below the training reference, measured in tests/test_drift_job.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import FixedWindows, GlobalWindows

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
_NO_EVIDENCE = -(2**63)
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
    return _NO_EVIDENCE if watermark_ms is None else watermark_ms


def _merged(reference: DriftReference, feature: str, summary: Optional[WindowSummary],
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
        return _merged(self._reference, partial.feature, summary, partial)

    def merge_accumulators(self, summaries) -> Optional[WindowSummary]:
        merged = None
        for summary in summaries:
            if summary is not None:
                merged = summary if merged is None else merged.merge(summary)
        return merged

    def extract_output(self, summary: Optional[WindowSummary]) -> Optional[WindowSummary]:
        return summary


class _Run(NamedTuple):
    first_window_start: int
    last_window_end: int
    windows: int


def _extend(run: Optional[_Run], stats: dict) -> Optional[_Run]:
    """The drift run this window continues or starts; None when it does not drift."""
    if not stats["drift"]:
        return None
    if run is None or run.last_window_end != stats["window_start"]:
        return _Run(stats["window_start"], stats["window_end"], 1)
    return _Run(run.first_window_start, stats["window_end"], run.windows + 1)


class _DriftRecords:
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

    def messages(self, stats: dict, run: Optional[_Run]) -> Iterator[OutgoingMessage]:
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
    """(feature, WindowSummary) of one window -> DriftStatistics record."""

    def __init__(self, records: _DriftRecords):
        self._records = records

    def process(self, element: tuple[str, Optional[WindowSummary]], window=beam.DoFn.WindowParam) -> Iterator[dict]:
        feature, summary = element
        if summary is not None:
            yield self._records.statistics(feature, window.start.micros // 1000, window.end.micros // 1000, summary)


class _DriftMessagesFn(beam.DoFn):
    """Keyed by feature: DriftStatistics in; its message out, and a RetrainTrigger's when a drift run is long enough."""

    RUN = ReadModifyWriteStateSpec("run", PickleCoder())

    def __init__(self, records: _DriftRecords):
        self._records = records

    def setup(self) -> None:
        skip_module_globals_scan()
        self._records.setup()

    def process(self, element: tuple[str, dict], run_state=beam.DoFn.StateParam(RUN)) -> Iterator[OutgoingMessage]:
        _, stats = element
        run = _extend(run_state.read(), stats)
        if run is None:
            run_state.clear()
        else:
            run_state.write(run)
        yield from self._records.messages(stats, run)


def _by_feature(stats: dict) -> tuple[str, dict]:
    return stats["feature"], stats


class _WindowedDrift(beam.PTransform):
    """Bounded runs: (feature, PartialSummary) in their windows -> drift and retrain OutgoingMessages, by Beam windows."""

    def __init__(self, reference: DriftReference, window_s: float, records: _DriftRecords):
        super().__init__()
        self._reference = reference
        self._window_s = window_s
        self._records = records

    def expand(self, values):
        return (
            values
            | "FixedWindows" >> beam.WindowInto(FixedWindows(self._window_s))
            | "Summarise" >> beam.CombinePerKey(_SummaryFn(self._reference))
            | "Statistics" >> beam.ParDo(_ToStatisticsFn(self._records))
            | "KeyByFeature" >> beam.Map(_by_feature).with_output_types(Tuple[str, Any])
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "ToMessages" >> beam.ParDo(_DriftMessagesFn(self._records))
        )


class _Evidence(NamedTuple):
    """One partition's watermark evidence: what earlier bundles showed, and what the current one shows."""

    committed: int
    pending: int
    bundle: str


@dataclass
class _FeatureWindows:
    """Everything one feature keeps in streaming: open windows by start, how far it has closed, evidence, drift run."""

    open: dict[int, WindowSummary] = field(default_factory=dict)
    closed_through: int = _NO_EVIDENCE
    evidence: dict[str, _Evidence] = field(default_factory=dict)
    run: Optional[_Run] = None

    def observe(self, partition: str, evidence_ms: int, bundle: str) -> None:
        """Records a value's evidence; the previous bundle's evidence of its partition becomes usable."""
        seen = self.evidence.get(partition, _Evidence(_NO_EVIDENCE, _NO_EVIDENCE, bundle))
        if seen.bundle != bundle:
            seen = _Evidence(max(seen.committed, seen.pending), _NO_EVIDENCE, bundle)
        self.evidence[partition] = seen._replace(pending=max(seen.pending, evidence_ms))

    def fleet_evidence(self) -> int:
        """The usable evidence of the slowest partition seen."""
        return min((e.committed for e in self.evidence.values()), default=_NO_EVIDENCE)


class _LiveWindowsFn(beam.DoFn):
    """Streaming, keyed by feature: PartialSummaries in; drift and retrain messages as the evidence closes windows.

    No timer, no GroupByKey: see the module docstring for why and when a window closes.
    """

    WINDOWS = ReadModifyWriteStateSpec("windows", PickleCoder())

    def __init__(self, reference: DriftReference, window_s: float, records: _DriftRecords, allowed_lateness_ms: int):
        self._reference = reference
        self._window_ms = int(window_s * 1000)
        self._records = records
        self._allowed_lateness_ms = allowed_lateness_ms
        self._late = beam.metrics.Metrics.counter(_METRICS, "late_values")

    def setup(self) -> None:
        skip_module_globals_scan()
        self._records.setup()

    def process(self, element: tuple[str, PartialSummary],
                state=beam.DoFn.StateParam(WINDOWS)) -> Iterator[OutgoingMessage]:
        _, partial = element
        windows: _FeatureWindows = state.read() or _FeatureWindows()
        self._add(windows, partial)
        windows.observe(partial.partition, partial.evidence_ms, partial.bundle)
        yield from self._close(partial.feature, windows, windows.fleet_evidence() - self._allowed_lateness_ms)
        state.write(windows)

    def _add(self, windows: _FeatureWindows, partial: PartialSummary) -> None:
        """Adds the values to their window, unless that window has closed (then they are counted late)."""
        start = partial.window_start
        if start + self._window_ms <= windows.closed_through:
            self._late.inc(partial.summary.events)
            return
        windows.open[start] = _merged(self._reference, partial.feature, windows.open.get(start), partial)

    def _close(self, feature: str, windows: _FeatureWindows, through_ms: int) -> Iterator[OutgoingMessage]:
        """Closes, in order, the windows that end at or before `through_ms`."""
        for start in sorted(s for s in windows.open if s + self._window_ms <= through_ms):
            stats = self._records.statistics(feature, start, start + self._window_ms, windows.open.pop(start))
            windows.run = _extend(windows.run, stats)
            yield from self._records.messages(stats, windows.run)
        windows.closed_through = max(windows.closed_through, through_ms)


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
    """(feature, PartialSummary) in; drift and retrain OutgoingMessages out, as the windows close.

    ``live``: close windows on the partials' watermark evidence, for streaming
    runs on the in-process runner (see the module docstring); False: Beam
    windowing. ``__score__`` windows never trigger retraining.
    """

    def __init__(self, reference: DriftReference, *, window_s: float, retrain_after_windows: int,
                 thresholds: DriftThresholds = DriftThresholds(), wire_format: str = "plain", live: bool = False,
                 policy: WatermarkPolicy = WatermarkPolicy()):
        super().__init__()
        self._reference = reference
        self._window_s = window_s
        self._records = _DriftRecords(reference, thresholds, retrain_after_windows, wire_format)
        self._live = live
        self._allowed_lateness_ms = policy.allowed_lateness_ms

    def expand(self, partials):
        if self._live:
            windows = _LiveWindowsFn(self._reference, self._window_s, self._records, self._allowed_lateness_ms)
            return partials | "LiveWindows" >> beam.ParDo(windows)
        return partials | "Windows" >> _WindowedDrift(self._reference, self._window_s, self._records)


class ComputeDrift(beam.PTransform):
    """(DecodeEvents' output, scoring OutgoingMessages) in; (readings', scores') drift and retrain messages out.

    Two branches and no Flatten: each ends in its own sink (see
    transforms/kafka_sink.py on Flatten in the in-process runner).
    """

    def __init__(self, reference: DriftReference, *, window_s: float, retrain_after_windows: int,
                 thresholds: DriftThresholds = DriftThresholds(), wire_format: str = "plain", live: bool = False,
                 policy: WatermarkPolicy = WatermarkPolicy()):
        super().__init__()
        self._partials = DriftPartials(reference, window_s=window_s, wire_format=wire_format, policy=policy)
        self._close = dict(reference=reference, window_s=window_s, retrain_after_windows=retrain_after_windows,
                           thresholds=thresholds, wire_format=wire_format, live=live, policy=policy)

    def expand(self, inputs):
        readings, scores = inputs | "Partials" >> self._partials
        return (readings | "ReadingDrift" >> CloseDriftWindows(**self._close),
                scores | "ScoreDrift" >> CloseDriftWindows(**self._close))
