"""Per-device state: calibration, imputation, LSTM step, evidence, expiry.

:class:`DeviceLogic` is the whole behaviour as a plain class, testable without
a pipeline; :class:`DeviceStateDoFn` only adapts it to Beam state and timers.
The detector maths is :class:`models.detector.DeviceDetector`; why all of it
runs here and only the read-out in RunInference is explained there.

Ordering and lateness policy (documented in the README):

* Events of a device advance its LSTM one step each, in arrival order as long
  as event times do not go backwards.
* An out-of-order event (event_time before the device's latest) is scored
  against the current state but does not advance it, so the state stays a
  function of the in-order events; it is counted in ``out_of_order_events``.
* Expiry is decided by the event stream alone: when a device's next event is
  ``state_ttl`` or more after its previous one, the state is reset first.
* An event-time timer reclaims the memory of idle devices. It is set when a
  device's state starts (its first event, or the first after a reset), at
  ``first event + state_ttl``, not on every event: when it fires and the
  device has had events since, it is re-armed at the current expiry,
  ``last event + state_ttl``. Runners may fire it early, so the timer clears
  state only when the source watermark carried by this partition's records
  has passed the expiry time; then every later on-time event of the device
  would reset it anyway, and clearing cannot change a score. Otherwise the
  firing counts as early and the timer is re-armed later, backing off, at
  most ``MAX_TIMER_REARMS`` times in the state's life; then it stays unset
  until the state is reset or cleared.
* The in-process FnApiRunner fires every timer of an unbounded source in the
  next bundle, whatever its time. A firing whose time is past every source
  watermark this worker has seen (no runner honouring watermarks does that)
  is early even when the device has had events since, so such a runner
  fires each device's timer at most ``MAX_TIMER_REARMS + 1`` times instead
  of once per bundle for as long as it is active. As before, it reclaims a
  device there only if the evidence passes the device's expiry within those
  firings (a flood of one-off ids followed by later data, say).
"""

from __future__ import annotations

import copy
import uuid
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from models.artifact import ModelArtifact, cached_artifact
from models.detector import DetectorState, DeviceDetector
from models.preprocessing import readings_vector
from transforms.dead_letters import Rejected
from transforms.decode import ValidEvent
from transforms.state_cache import skip_module_globals_scan

_METRICS = "device_state"
MAX_TIMER_REARMS = 8

# Highest source watermark seen per partition, per job, shared by every DoFn
# instance in this worker process: a runner may fire a device's timer on an
# instance other than the one that saw the evidence. A racy update can only
# lower a value, which makes the expiry guard more cautious, never wrong.
_SOURCE_WATERMARKS: dict[str, dict[str, int]] = {}


class DeviceState:
    """Everything kept for one device between its events."""

    __slots__ = ("detector", "last_event_time", "partition", "rearms")

    def __init__(self, detector: DetectorState):
        self.detector = detector
        self.last_event_time = -1
        self.partition = ""
        self.rearms = 0

    def __getstate__(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, values):
        for name, value in zip(self.__slots__, values):
            setattr(self, name, value)


class ScoringContext(NamedTuple):
    """What the score record needs besides the model output."""

    event: ValidEvent
    imputed: tuple[str, ...]
    calibrating: bool


class StepResult(NamedTuple):
    state: DeviceState
    model_input: np.ndarray  # [evidence, observed, alarm level]: the ScoringHead's row
    imputed: tuple[str, ...]
    calibrating: bool
    reset: bool
    in_order: bool


class DeviceLogic:
    """One device's life: on_event, expires_at, may_clear."""

    def __init__(self, artifact: ModelArtifact, state_ttl_ms: int, calibration_events: int, quantize: str = "none"):
        self.features = artifact.features
        scale = artifact.forecaster().residual_scale.numpy()
        self._detector = DeviceDetector(artifact.step(quantize), scale, artifact.post_processing, calibration_events)
        self.state_ttl_ms = state_ttl_ms

    def new_state(self) -> DeviceState:
        return DeviceState(self._detector.new_state())

    def on_event(self, state: Optional[DeviceState], event_time: int, readings: dict, partition: str) -> StepResult:
        """Prepares the event's model input and advances the state by one step."""
        reset = state is not None and event_time - state.last_event_time >= self.state_ttl_ms
        if state is None or reset:
            state = self.new_state()
        values = readings_vector(readings, self.features)
        imputed = tuple(name for name, missing in zip(self.features, np.isnan(values).tolist()) if missing)
        in_order = event_time >= state.last_event_time
        # An out-of-order event works on a throwaway copy: the real state stays untouched.
        detector_state = state.detector if in_order else copy.deepcopy(state.detector)
        model_input, calibrating = self._detector.update(detector_state, values)
        if in_order:
            state.last_event_time = event_time
            state.partition = partition
        return StepResult(state, model_input, imputed, calibrating, reset, in_order)

    def expires_at(self, state: DeviceState) -> int:
        return state.last_event_time + self.state_ttl_ms

    def may_clear(self, state: DeviceState, source_watermark_ms: int) -> bool:
        """True when clearing now cannot change any on-time score."""
        return self.expires_at(state) <= source_watermark_ms


class DeviceStateDoFn(beam.DoFn):
    """Keyed by device_id: (device_id, ValidEvent) in, (ScoringContext, model input row) out.

    Rejected records (keyed by partition) pass through as (Rejected, None),
    touching no state, on their way to the one sink.
    """

    DEVICE = ReadModifyWriteStateSpec("device", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, model_dir: str, state_ttl_s: float, calibration_events: int, quantize: str = "none"):
        self._job_token = uuid.uuid4().hex
        self._model_dir = model_dir
        self._state_ttl_ms = int(state_ttl_s * 1000)
        self._calibration_events = calibration_events
        self._quantize = quantize
        counter = beam.metrics.Metrics.counter
        self._events = counter(_METRICS, "events")
        self._out_of_order = counter(_METRICS, "out_of_order_events")
        self._resets = counter(_METRICS, "state_resets_after_gap")
        self._new_devices = counter(_METRICS, "devices_started")
        # Up on a device's first event, down when its state is reclaimed: the devices holding memory now.
        self._live_devices = counter(_METRICS, "devices_with_live_state")
        self._expired = counter(_METRICS, "state_expirations")
        self._early_timers = counter(_METRICS, "early_timer_firings")

    def setup(self) -> None:
        skip_module_globals_scan()
        self._logic = DeviceLogic(cached_artifact(self._model_dir), self._state_ttl_ms, self._calibration_events,
                                  self._quantize)
        self._source_watermarks = _SOURCE_WATERMARKS.setdefault(self._job_token, {})

    def process(
        self,
        element: tuple[str, ValidEvent | Rejected],
        device=beam.DoFn.StateParam(DEVICE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[tuple[ScoringContext | Rejected, np.ndarray | None]]:
        _, event = element
        if isinstance(event, Rejected):
            yield event, None
            return
        partition = f"{event.source.topic}:{event.source.partition}"
        if event.watermark_ms > self._source_watermarks.get(partition, -1):
            self._source_watermarks[partition] = event.watermark_ms
        previous = device.read()
        step = self._logic.on_event(previous, event.event_time, event.readings, partition)
        device.write(step.state)
        self._count(previous, step)
        if previous is None or step.reset:  # a new state: later events leave the timer to move itself
            expiry.set(Timestamp.of(self._logic.expires_at(step.state) / 1000))
        yield ScoringContext(event, step.imputed, step.calibrating), step.model_input

    def _count(self, previous: Optional[DeviceState], step: StepResult) -> None:
        self._events.inc()
        if previous is None:
            self._new_devices.inc()
            self._live_devices.inc()
        if step.reset:
            self._resets.inc()
        if not step.in_order:
            self._out_of_order.inc()

    @on_timer(EXPIRY)
    def expire(
        self,
        fire_time=beam.DoFn.TimestampParam,
        device=beam.DoFn.StateParam(DEVICE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> None:
        state: Optional[DeviceState] = device.read()
        if state is None:
            return
        fire_ms = fire_time.micros // 1000
        if self._logic.may_clear(state, self._source_watermarks.get(state.partition, -1)):
            device.clear()
            self._expired.inc()
            self._live_devices.dec()
            return
        expires_ms = self._logic.expires_at(state)
        ahead_of_the_data = fire_ms > max(self._source_watermarks.values(), default=-1)
        if expires_ms > fire_ms and not ahead_of_the_data:  # events since it was set: not due yet
            expiry.set(Timestamp.of(expires_ms / 1000))
            return
        self._early_timers.inc()
        if state.rearms < MAX_TIMER_REARMS:
            state.rearms += 1
            later_ms = fire_ms + self._logic.state_ttl_ms * 2**state.rearms
            expiry.set(Timestamp.of(max(later_ms, expires_ms) / 1000))
        else:
            state.rearms = MAX_TIMER_REARMS + 1  # no timer now, until the state is reset or cleared
        device.write(state)
