"""Workarounds for the in-process FnApiRunner in streaming, and nothing else: every other runner skips them.

In streaming, the in-process runner (what ``--runner DirectRunner`` runs here)

* fires every event-time timer of an unbounded source in its next round,
  whatever the timer's time, long before the watermark gets there;
* holds back the output of a Flatten or GroupByKey until the watermark reaches
  the end of time, which never happens in streaming;
* runs the whole job in one process and on one thread.

So, chosen in one place (``beam_jobs.pipelines.in_process_streaming``), a
streaming job on it:

* clears an idle device's state only once a record of the device's partition
  has carried a watermark past the device's reclaim time (the *evidence*),
  and *parks* devices whose timer fired ahead of the evidence on a
  per-partition wait list in the worker process, woken by the first record
  whose evidence passes their reclaim time (:class:`EvidenceDeviceStateDoFn`,
  :class:`WakeParkedDevicesFn`): clearing is never observable, as with timers
  that fire on time, and each device's timer fires once, not once per round;
* closes drift windows in a stateful DoFn keyed by feature, on the evidence
  the partial summaries carry, instead of FixedWindows and a combine
  (:class:`CloseLiveDriftWindows`);
* lets rejected records ride the keyed stream to the one sink as
  (Rejected, None), instead of a tagged output flattened before the sink
  (``DecodeEvents(rejected_inline=True)``; the device state passes them on,
  the model handler wrapper and the message step turn them into dead letters).

Bounded runs on the in-process runner keep Beam's semantics (the watermark
reaches the end of time when the input ends) and take the plain path.
Wait lists live in the worker process, like the evidence: on this runner the
whole job is one fused stage in one process, so parking and waking meet.
"""

from __future__ import annotations

import heapq
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import Timestamp

from models.drift_reference import DriftReference
from models.rollout import RolloutConfig
from transforms.dead_letters import Rejected
from transforms.decode import DeviceEvents
from transforms.device_state import DeviceState, DeviceStateDoFn, ScoringContext
from transforms.drift import NO_EVIDENCE, DriftRecords, DriftRun, extend_run, merged_summary
from transforms.drift_partials import PartialSummary
from transforms.drift_stats import DriftThresholds, WindowSummary
from transforms.event_time import WatermarkPolicy
from transforms.kafka_sink import OutgoingMessage
from transforms.offset_commits import partition_key
from transforms.state_cache import skip_module_globals_scan

MAX_TIMER_REARMS = 8


class ExpiryCheck(NamedTuple):
    """Sent down a parked device's key: its partition's evidence passed the reclaim time it was parked at."""

    parked_reclaim_ms: int


class ExpiryEvidence:
    """Per job and worker process: the newest source watermark per partition, and the parked devices."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watermarks: dict[str, int] = {}
        self._parked: dict[str, list[tuple[int, str]]] = {}

    def observe(self, partition: str, watermark_ms: int) -> None:
        if watermark_ms <= self._watermarks.get(partition, -1):
            return  # the common case, once per event: no lock (watermarks only grow)
        with self._lock:
            if watermark_ms > self._watermarks.get(partition, -1):
                self._watermarks[partition] = watermark_ms

    def watermark(self, partition: str) -> int:
        return self._watermarks.get(partition, -1)

    def newest_watermark(self) -> int:
        """The furthest any partition's records have carried the watermark in this process."""
        with self._lock:
            return max(self._watermarks.values(), default=-1)

    def park(self, partition: str, reclaim_ms: int, device_id: str) -> None:
        with self._lock:
            heapq.heappush(self._parked.setdefault(partition, []), (reclaim_ms, device_id))

    def due(self, partition: str, evidence_ms: int) -> list[tuple[int, str]]:
        """Pops the (expiry, device_id) of the partition's parked devices that `evidence_ms` has passed."""
        # The common case, once per event, takes no lock: a racing park is seen at the next record.
        try:
            if self._parked[partition][0][0] > evidence_ms:
                return []
        except (KeyError, IndexError):  # nothing parked for the partition (or another thread emptied it)
            return []
        with self._lock:
            waiting = self._parked.get(partition)
            due = []
            while waiting and waiting[0][0] <= evidence_ms:
                due.append(heapq.heappop(waiting))
            return due


_EVIDENCE: dict[str, ExpiryEvidence] = {}


def evidence_for(job_token: str) -> ExpiryEvidence:
    """The job's evidence in this worker process, shared by every DoFn instance of the job here."""
    return _EVIDENCE.setdefault(job_token, ExpiryEvidence())


class WakeParkedDevicesFn(beam.DoFn):
    """Passes the keyed stream through, adding an ExpiryCheck for each parked device that is due.

    It tracks the evidence it has seen on its own: the device DoFn decides
    with the evidence of the records it has processed itself, and a runner
    may run this step ahead of it over a whole bundle. A check follows the
    device's events that made it due, so a runner that passes elements on one
    at a time (the fused in-process stage) lets the device DoFn see their
    evidence first; a check that still finds the evidence short parks the
    device again, for the next events to wake.
    """

    def __init__(self, job_token: str):
        self._job_token = job_token
        self._woken = beam.metrics.Metrics.counter("device_state", "parked_devices_woken")

    def setup(self) -> None:
        self._evidence = evidence_for(self._job_token)
        self._watermarks: dict[str, int] = {}

    def process(self, element: tuple[str, Any]) -> Iterator[tuple[str, Any]]:
        yield element
        _, device_events = element
        if not isinstance(device_events, DeviceEvents):
            return
        for partition in self._observe(device_events):
            for reclaim_ms, device_id in self._evidence.due(partition, self._watermarks.get(partition, -1)):
                self._woken.inc()
                yield device_id, ExpiryCheck(reclaim_ms)

    def _observe(self, device_events: DeviceEvents) -> set[str]:
        """Takes in the events' source watermarks; the partitions they came from."""
        partitions = set()
        for event in device_events.events:
            partition = partition_key(event.source.topic, event.source.partition)
            if event.watermark_ms is not None:
                self._watermarks[partition] = max(event.watermark_ms, self._watermarks.get(partition, -1))
            partitions.add(partition)
        return partitions


class EvidenceDeviceStateDoFn(DeviceStateDoFn):
    """DeviceStateDoFn for the in-process runner's early timers: clears on evidence, parks what fires early.

    Rejected records (keyed by partition) pass through as (Rejected, None),
    touching no state, on their way to the one sink. An ExpiryCheck (from
    :class:`WakeParkedDevicesFn`) clears a parked device or parks it again.
    A firing whose partition evidence lags is re-armed later, backing off, at
    most ``MAX_TIMER_REARMS`` times in the state's life; a firing ahead of
    every watermark this worker has seen, or past the back-off, parks the
    device instead.
    """

    def __init__(self, rollout: RolloutConfig, state_ttl_s: float, allowed_lateness_s: float = 0.0):
        super().__init__(rollout, state_ttl_s, allowed_lateness_s)
        self.job_token = uuid.uuid4().hex  # pairs this DoFn with its wake-up step in each worker process
        self._early_timers = beam.metrics.Metrics.counter("device_state", "early_timer_firings")
        self._parked = beam.metrics.Metrics.counter("device_state", "devices_parked")

    def setup(self) -> None:
        super().setup()
        self._evidence = evidence_for(self.job_token)

    def process(
        self,
        element: tuple[str, DeviceEvents | Rejected | ExpiryCheck],
        device=beam.DoFn.StateParam(DeviceStateDoFn.DEVICE),
        expiry=beam.DoFn.TimerParam(DeviceStateDoFn.EXPIRY),
    ) -> Iterator[tuple[ScoringContext | Rejected, np.ndarray | None]]:
        device_id, payload = element
        if isinstance(payload, Rejected):
            yield payload, None
        elif isinstance(payload, ExpiryCheck):
            self._check_parked(device_id, device)
        else:
            for event in payload.events:
                if event.watermark_ms is not None:
                    self._evidence.observe(partition_key(event.source.topic, event.source.partition),
                                           event.watermark_ms)
            yield from self._step(device_id, payload, device, expiry)

    def _clear_if_due(self, state: DeviceState, device) -> bool:
        if not self._logic.may_clear(state, self._evidence.watermark(state.partition)):
            return False
        self._reclaim(device)
        return True

    def _park(self, state: DeviceState, device_id: str) -> None:
        self._parked.inc()
        self._evidence.park(state.partition, self._logic.reclaim_at(state), device_id)

    def _check_parked(self, device_id: str, device) -> None:
        state: Optional[DeviceState] = device.read()
        if state is not None and not self._clear_if_due(state, device):
            self._park(state, device_id)  # events since it was parked: wait for the new reclaim time

    def on_expiry(self, device_id: str, fire_ms: int, state: DeviceState, device, expiry) -> None:
        """A firing may be early here: clear on evidence only; re-arm, back off or park otherwise."""
        if self._clear_if_due(state, device):
            return
        reclaim_ms = self._logic.reclaim_at(state)
        if fire_ms > self._evidence.newest_watermark():  # fired ahead of all the data: the runner fires early
            self._park(state, device_id)
            return
        if reclaim_ms > fire_ms:  # events since it was set: not due yet
            expiry.set(Timestamp.of(reclaim_ms / 1000))
            return
        self._early_timers.inc()  # due, but the partition's evidence lags the watermark
        if state.rearms < MAX_TIMER_REARMS:
            state.rearms += 1
            device.write(state)
            expiry.set(Timestamp.of((fire_ms + self._logic.state_ttl_ms * 2**state.rearms) / 1000))
        else:
            self._park(state, device_id)


class KeepDeviceStateOnEvidence(beam.PTransform):
    """DecodeEvents' keyed stream (rejected records inline) in, the device state's output out, parked devices woken."""

    def __init__(self, rollout: RolloutConfig, state_ttl_s: float, allowed_lateness_s: float = 0.0):
        super().__init__()
        self._device_state = EvidenceDeviceStateDoFn(rollout, state_ttl_s, allowed_lateness_s)

    def expand(self, keyed: beam.PCollection[tuple[str, Any]]) -> beam.PCollection:
        return (
            keyed
            | "WakeParkedDevices" >> beam.ParDo(WakeParkedDevicesFn(self._device_state.job_token))
            .with_output_types(Tuple[str, Any])
            | "Step" >> beam.ParDo(self._device_state)
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
    closed_through: int = NO_EVIDENCE
    evidence: dict[str, _Evidence] = field(default_factory=dict)
    run: Optional[DriftRun] = None

    def observe(self, partition: str, evidence_ms: int, bundle: str) -> None:
        """Records a value's evidence; the previous bundle's evidence of its partition becomes usable."""
        seen = self.evidence.get(partition, _Evidence(NO_EVIDENCE, NO_EVIDENCE, bundle))
        if seen.bundle != bundle:
            seen = _Evidence(max(seen.committed, seen.pending), NO_EVIDENCE, bundle)
        self.evidence[partition] = seen._replace(pending=max(seen.pending, evidence_ms))

    def fleet_evidence(self) -> int:
        """The usable evidence of the slowest partition seen."""
        return min((e.committed for e in self.evidence.values()), default=NO_EVIDENCE)


class _LiveWindowsFn(beam.DoFn):
    """Keyed by feature: PartialSummaries in; drift and retrain messages as the evidence closes windows.

    No timer, no GroupByKey (see the module docstring). The evidence of a
    partial is the highest watermark its values were read with; a
    partition's evidence counts only from its next bundle on: within a
    bundle, the per-device shuffle of the scoring path reorders values, and a
    later bundle holds none of an earlier one's. A window closes once every
    partition seen has carried its watermark past the window's end plus the
    allowed lateness; late values never reach here (transforms/drift.py), so
    the window holds what Beam windowing would give it.
    """

    WINDOWS = ReadModifyWriteStateSpec("windows", PickleCoder())

    def __init__(self, reference: DriftReference, window_s: float, records: DriftRecords, allowed_lateness_ms: int):
        self._reference = reference
        self._window_ms = int(window_s * 1000)
        self._records = records
        self._allowed_lateness_ms = allowed_lateness_ms
        self._late = beam.metrics.Metrics.counter("drift", "late_values")

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
        windows.open[start] = merged_summary(self._reference, partial.feature, windows.open.get(start), partial)

    def _close(self, feature: str, windows: _FeatureWindows, through_ms: int) -> Iterator[OutgoingMessage]:
        """Closes, in order, the windows that end at or before `through_ms`."""
        for start in sorted(s for s in windows.open if s + self._window_ms <= through_ms):
            stats = self._records.statistics(feature, start, start + self._window_ms, windows.open.pop(start))
            windows.run = extend_run(windows.run, stats)
            yield from self._records.messages(stats, windows.run)
        windows.closed_through = max(windows.closed_through, through_ms)


class CloseLiveDriftWindows(beam.PTransform):
    """(feature, PartialSummary) in; drift and retrain OutgoingMessages out, as the evidence closes windows.

    It takes drift.CloseDriftWindows' arguments, to stand in for it (drift.ComputeDrift's `close`).
    """

    def __init__(self, reference: DriftReference, *, window_s: float, retrain_after_windows: int,
                 thresholds: DriftThresholds = DriftThresholds(), wire_format: str = "plain",
                 policy: WatermarkPolicy = WatermarkPolicy()):
        super().__init__()
        records = DriftRecords(reference, thresholds, retrain_after_windows, wire_format)
        self._windows = _LiveWindowsFn(reference, window_s, records, policy.allowed_lateness_ms)

    def expand(self, partials):
        return partials | "LiveWindows" >> beam.ParDo(self._windows)
