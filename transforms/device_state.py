"""Per-device state: calibration, imputation, LSTM step, evidence, expiry.

:class:`DeviceLogic` is the whole behaviour as a plain class, testable without
a pipeline; :class:`DeviceStateDoFn` only adapts it to Beam state and timers.
The detector maths is :class:`models.detector.DeviceDetector`; why all of it
runs here and only the read-out in RunInference is explained there. Which
models serve a device (primary or canary, and a shadow), how they are swapped
without a restart, and when a device's state survives a swap is
:mod:`models.rollout`: the device keeps a detector state per model it is
served by, and each event yields one model input per serving model.

Ordering, lateness and expiry (documented in the README):

* Events of a device advance its LSTM one step each, in arrival order as long
  as event times do not go backwards.
* An out-of-order event (event_time before the device's latest) is scored
  against the current state but does not advance it, so the state stays a
  function of the in-order events; it is counted in ``out_of_order_events``.
* Expiry is decided by the event stream alone. The state is reset before an
  event when the event comes ``state_ttl`` or more after the device's
  previous one, or when its partition's watermark, as the event was read
  with it, had passed the device's *reclaim time*: last event + TTL + the
  allowed lateness (transforms/event_time.py). On time events that the
  second rule resets, the first one resets too; it decides late events.
* An event-time timer at the reclaim time frees the memory of idle devices.
  It fires once the watermark has passed the reclaim time, so every event
  the device can still receive resets its state anyway: clearing it then
  changes no score, whenever the runner fires the timer. The timer is set
  when a state starts, not on every event; a firing that finds events since
  moves it to the current reclaim time. Runners that fire timers early (the
  in-process runner in streaming) use the checks of
  :mod:`transforms.in_process_runner` instead.
"""

from __future__ import annotations

import copy
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from models.artifact import ModelArtifact
from models.detector import DetectorState
from models.preprocessing import readings_vector
from models.rollout import ModelSource, RolloutConfig, ServedModel, ServingModel, fixed_models, watch_models
from transforms.decode import DeviceEvents, ValidEvent
from transforms.live_stats import LIVE
from transforms.offset_commits import partition_key
from transforms.state_cache import skip_module_globals_scan

_METRICS = "device_state"


class DeviceState:
    """Everything kept for one device between its events; detector states by model state signature."""

    __slots__ = ("detectors", "last_event_time", "partition", "rearms")

    def __init__(self):
        self.detectors: dict[str, DetectorState] = {}
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
    model: ServedModel


class ModelStep(NamedTuple):
    """One serving model's part of an event."""

    model: ServedModel
    model_input: np.ndarray  # [evidence, observed, alarm level]: the ScoringHead's row
    imputed: tuple[str, ...]
    calibrating: bool


class StepResult(NamedTuple):
    state: DeviceState
    steps: tuple[ModelStep, ...]  # the deciding model's first, then the shadow's
    reset: bool
    in_order: bool

    @property
    def model_input(self) -> np.ndarray:
        return self.steps[0].model_input

    @property
    def calibrating(self) -> bool:
        return self.steps[0].calibrating

    @property
    def imputed(self) -> tuple[str, ...]:
        return self.steps[0].imputed


class DeviceLogic:
    """One device's life: on_event, reclaim_at, may_clear."""

    def __init__(self, models: ModelSource, state_ttl_ms: int, allowed_lateness_ms: int = 0):
        self._models = models
        self.state_ttl_ms = state_ttl_ms
        self.allowed_lateness_ms = allowed_lateness_ms

    @classmethod
    def for_artifact(cls, artifact: ModelArtifact, state_ttl_ms: int, calibration_events: int,
                     quantize: str = "none") -> "DeviceLogic":
        """One fixed model: offline tools, benchmarks, tests."""
        return cls(fixed_models(artifact, calibration_events, quantize), state_ttl_ms)

    def models_for(self, device_id: str) -> tuple[ServingModel, ...]:
        """The models serving the device now; the roster may change between calls (models/rollout.py)."""
        return self._models().models_for(device_id)

    def on_event(self, state: Optional[DeviceState], event_time: int, readings: dict, partition: str,
                 device_id: str = "", models: Optional[tuple[ServingModel, ...]] = None,
                 read_watermark_ms: Optional[int] = None) -> StepResult:
        """Prepares the event's model inputs and advances the state by one step.

        `models` is :meth:`models_for` the device, from a caller that steps
        several of its events at once and looks the roster up once for them.
        `read_watermark_ms` is the event's partition watermark when it was read.
        """
        reset = state is not None and (
            event_time - state.last_event_time >= self.state_ttl_ms
            or (read_watermark_ms is not None and self.may_clear(state, read_watermark_ms)))
        if state is None or reset:
            state = DeviceState()
        in_order = event_time >= state.last_event_time
        stepped: dict[str, tuple[DetectorState, np.ndarray, bool]] = {}
        steps = tuple(self._step(serving, state, stepped, readings, in_order)
                      for serving in models or self.models_for(device_id))
        if in_order:
            # States of models that no longer serve the device are dropped here.
            state.detectors = {signature: detector for signature, (detector, _, _) in stepped.items()}
            state.last_event_time = event_time
            state.partition = partition
        return StepResult(state, steps, reset, in_order)

    @staticmethod
    def _step(serving: ServingModel, state: DeviceState, stepped: dict[str, tuple[DetectorState, np.ndarray, bool]],
              readings: dict, in_order: bool) -> ModelStep:
        """Advances the serving model's detector state, once per event even when two roles share it."""
        features = serving.served.features
        values = readings_vector(readings, features)
        imputed = tuple(name for name, missing in zip(features, np.isnan(values).tolist()) if missing)
        if serving.signature not in stepped:
            detector_state = state.detectors.get(serving.signature) or serving.detector.new_state()
            # An out-of-order event works on a throwaway copy: the real state stays untouched.
            if not in_order:
                detector_state = copy.deepcopy(detector_state)
            stepped[serving.signature] = (detector_state, *serving.detector.update(detector_state, values))
        _, model_input, calibrating = stepped[serving.signature]
        return ModelStep(serving.served, model_input, imputed, calibrating)

    def reclaim_at(self, state: DeviceState) -> int:
        """When the state may go: its last event + TTL + the allowed lateness."""
        return state.last_event_time + self.state_ttl_ms + self.allowed_lateness_ms

    def may_clear(self, state: DeviceState, source_watermark_ms: int) -> bool:
        """True when clearing now cannot change any score: every later event resets the state anyway."""
        return self.reclaim_at(state) <= source_watermark_ms


class DeviceStateDoFn(beam.DoFn):
    """Keyed by device_id: (device_id, DeviceEvents) in, (ScoringContext, model input row) per event out.

    The state is read once and written once per DeviceEvents, whatever the
    number of events in it. Its timer clears the state when it fires (see the
    module docstring), as runners that keep Beam's timer semantics fire it.
    """

    DEVICE = ReadModifyWriteStateSpec("device", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, rollout: RolloutConfig, state_ttl_s: float, allowed_lateness_s: float = 0.0):
        self._rollout = rollout
        self._state_ttl_ms = int(state_ttl_s * 1000)
        self._allowed_lateness_ms = int(allowed_lateness_s * 1000)
        counter = beam.metrics.Metrics.counter
        self._events = counter(_METRICS, "events")
        self._out_of_order = counter(_METRICS, "out_of_order_events")
        self._resets = counter(_METRICS, "state_resets_after_gap")
        self._new_devices = counter(_METRICS, "devices_started")
        # Up on a device's first event, down when its state is reclaimed: the devices holding memory now.
        self._live_devices = counter(_METRICS, "devices_with_live_state")
        self._expired = counter(_METRICS, "state_expirations")

    def setup(self) -> None:
        skip_module_globals_scan()
        self._logic = DeviceLogic(watch_models(self._rollout), self._state_ttl_ms, self._allowed_lateness_ms)

    def process(
        self,
        element: tuple[str, DeviceEvents],
        device=beam.DoFn.StateParam(DEVICE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[tuple[ScoringContext, np.ndarray]]:
        device_id, device_events = element
        yield from self._step(device_id, device_events, device, expiry)

    def _step(self, device_id: str, device_events: DeviceEvents, device, expiry
              ) -> Iterator[tuple[ScoringContext, np.ndarray]]:
        """Steps the device through its events, in order, with one state read and one write."""
        state: Optional[DeviceState] = device.read()
        models = self._logic.models_for(device_id)  # once for the events of this element
        for event in device_events.events:
            partition = partition_key(event.source.topic, event.source.partition)
            step = self._logic.on_event(state, event.event_time, event.readings, partition, device_id, models,
                                        event.watermark_ms)
            self._count(state, step)
            if state is None or step.reset:  # a new state: later events leave the timer to move itself
                expiry.set(Timestamp.of(self._logic.reclaim_at(step.state) / 1000))
            state = step.state
            for model_step in step.steps:
                context = ScoringContext(event, model_step.imputed, model_step.calibrating, model_step.model)
                yield context, model_step.model_input
        device.write(state)

    def _count(self, previous: Optional[DeviceState], step: StepResult) -> None:
        self._events.inc()
        if previous is None:
            self._new_devices.inc()
            self._live_devices.inc()
            LIVE.add("devices_started")
        if step.reset:
            self._resets.inc()
        if not step.in_order:
            self._out_of_order.inc()

    def _reclaim(self, device) -> None:
        device.clear()
        self._expired.inc()
        self._live_devices.dec()
        LIVE.add("devices_expired")

    @on_timer(EXPIRY)
    def expire(
        self,
        device_id=beam.DoFn.KeyParam,
        fire_time=beam.DoFn.TimestampParam,
        device=beam.DoFn.StateParam(DEVICE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> None:
        state: Optional[DeviceState] = device.read()
        if state is not None:
            self.on_expiry(device_id, fire_time.micros // 1000, state, device, expiry)

    def on_expiry(self, device_id: str, fire_ms: int, state: DeviceState, device, expiry) -> None:
        """The timer fired at `fire_ms` on a device with state: the watermark has passed it, so reclaim if due."""
        reclaim_ms = self._logic.reclaim_at(state)
        if reclaim_ms > fire_ms:  # events since it was set: not due yet
            expiry.set(Timestamp.of(reclaim_ms / 1000))
        else:
            self._reclaim(device)


class KeepDeviceState(beam.PTransform):
    """DecodeEvents' keyed stream in, DeviceStateDoFn's output out."""

    def __init__(self, rollout: RolloutConfig, state_ttl_s: float, allowed_lateness_s: float = 0.0):
        super().__init__()
        self._device_state = DeviceStateDoFn(rollout, state_ttl_s, allowed_lateness_s)

    def expand(self, keyed: beam.PCollection[tuple[str, DeviceEvents]]) -> beam.PCollection:
        return keyed | "Step" >> beam.ParDo(self._device_state)
