"""One device's detector: calibration, imputation, the recurrent step and the evidence.

Everything here is sequential per device, so it all runs in the per-device
stateful DoFn; what leaves it for RunInference is one row per event,
``[evidence_1..F, observed_1..F, alarm_level]``, that the stateless
:class:`models.lstm.ScoringHead` turns into the score and contributions.

Why the split falls there: the evidence of event t is an EWMA over the
forecast residuals of every event before it, and the residual of event t needs
the forecast made from h_{t-1}. Beam has no feedback loop from RunInference to
the DoFn, so anything the next event depends on must be computed in the DoFn.
Putting the forecast in RunInference would need a second keyed DoFn after it
that restores per-device event order (RunInference batches across bundles do
not keep it), with sequence numbers, buffering, and state that expires in step
with the first; computing the forecast in both places would do the work twice.
So the DoFn makes the forecast of the next event eagerly, right after the LSTM
step, and the head only reads the evidence out. Scores then depend on the
device's event sequence alone, never on bundles, batches or timer firings.

Calibration (the first ``calibration_events`` events): readings are buffered;
at the last one the device fits its baseline (median/std), replays the buffer
through the model from a zero state, and fits its evidence weights and alarm
level from the replayed residuals. Until then its rows have alarm level 0,
which the head scores 0. After that, per event:

1. forward-fill missing readings, normalise with the baseline (z);
2. per-feature contribution ``c_j = ((z_j - ẑ_j) / r_j)²``, divided by the
   device's calibration mean (floored) and capped, so each reading's evidence
   is in units of its own normal residual and one spike cannot dominate;
3. per-feature EWMA of that, updated only for observed readings (an imputed
   reading adds no evidence);
4. one recurrent step: (h, c) advance and the forecast of the next event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from torch import nn

from models.lstm import numpy_step
from models.preprocessing import Baseline, fit_baseline, forward_fill

LEVEL_FLOOR = 1e-6


@dataclass(frozen=True)
class PostProcessing:
    """How residuals become per-device evidence and an alarm level (stored in the artifact).

    ``factor`` times the ``quantile`` of the device's calibration scores is its
    alarm threshold; the first eighth of calibration is warm-up and is left out
    of the weights and the quantile.
    """

    ewma_span: int = 45
    cap: float = 10.0
    floor: float = 0.5
    quantile: float = 0.99
    factor: float = 1.5

    @property
    def alpha(self) -> float:
        return 2.0 / (self.ewma_span + 1.0)

    def as_dict(self) -> dict:
        return asdict(self)


def warm_up_events(calibration_events: int) -> int:
    return calibration_events // 8


_PACKED = "packed-1"  # marks DetectorState's pickled form below; the older form is one value per slot


class DetectorState:
    """Everything one device's detector keeps between events; picklable, a few hundred floats.

    It pickles compactly (Beam keeps it with PickleCoder and encodes it per
    device and bundle): every float64 array, calibration buffer included, is
    packed into one byte string, h and c into another, so the cost does not
    grow with a pickle header per array: about a quarter of the time of
    pickling each array (60 us -> 15 us for a state with a full calibration
    buffer). Values round-trip exactly; the arrays come back as views of one
    writable array per dtype. States pickled in the older form still load
    (and arrays of other dtypes than the detector makes are pickled that way).
    """

    __slots__ = ("events_seen", "buffer", "baseline", "last", "h", "c", "forecast", "weights", "level", "evidence")

    def __init__(self, n_features: int, hidden_size: int):
        self.events_seen = 0
        self.buffer: Optional[list[np.ndarray]] = []
        self.baseline: Optional[Baseline] = None
        self.last = np.full(n_features, np.nan)
        self.h = np.zeros(hidden_size, dtype=np.float32)
        self.c = np.zeros(hidden_size, dtype=np.float32)
        self.forecast: Optional[np.ndarray] = None
        self.weights = np.ones(n_features)
        self.level = 0.0
        self.evidence = np.zeros(n_features)

    def __getstate__(self):
        arrays = [self.last, self.weights, self.evidence]
        if self.forecast is not None:
            arrays.append(self.forecast)
        if self.baseline is not None:
            arrays += [self.baseline.median, self.baseline.scale]
        if self.buffer:
            arrays += self.buffer
        if any(a.dtype != np.float64 for a in arrays) or self.h.dtype != np.float32 or self.c.dtype != np.float32:
            return tuple(getattr(self, name) for name in self.__slots__)  # other dtypes: as they are
        return (_PACKED, self.events_seen, self.level, len(self.last), None if self.buffer is None else len(self.buffer),
                self.forecast is not None, self.baseline is not None,
                np.concatenate(arrays).tobytes(), np.concatenate([self.h, self.c]).tobytes())

    def __setstate__(self, values):
        if values[0] != _PACKED:
            for name, value in zip(self.__slots__, values):
                setattr(self, name, value)
            return
        _, self.events_seen, self.level, n, rows, has_forecast, has_baseline, floats, hidden = values
        x = np.frombuffer(floats, dtype=np.float64).copy()
        hc = np.frombuffer(hidden, dtype=np.float32).copy()
        self.h, self.c = hc[: len(hc) // 2], hc[len(hc) // 2 :]
        self.last, self.weights, self.evidence = x[:n], x[n : 2 * n], x[2 * n : 3 * n]
        at = 3 * n
        self.forecast = None
        if has_forecast:
            self.forecast, at = x[at : at + n], at + n
        self.baseline = None
        if has_baseline:
            self.baseline, at = Baseline(x[at : at + n], x[at + n : at + 2 * n]), at + 2 * n
        self.buffer = None if rows is None else [x[at + i * n : at + (i + 1) * n] for i in range(rows)]


class DeviceDetector:
    """The per-device logic around one (possibly int8) :class:`models.lstm.RecurrentStep`."""

    def __init__(self, step: nn.Module, residual_scale: np.ndarray, post: PostProcessing, calibration_events: int):
        self._step = numpy_step(step)
        self._scale = np.asarray(residual_scale, dtype=np.float64)
        self._post = post
        self.calibration_events = calibration_events
        self.hidden_size = self._step.hidden_size

    def new_state(self) -> DetectorState:
        return DetectorState(len(self._scale), self.hidden_size)

    def update(self, state: DetectorState, values: np.ndarray) -> tuple[np.ndarray, bool]:
        """This event's head row, and whether it was a calibration event; advances `state`."""
        observed = ~np.isnan(values)
        state.events_seen += 1
        calibrating = state.baseline is None
        if calibrating:
            state.buffer.append(values)
            if state.events_seen >= self.calibration_events:
                self._calibrate(state)
        else:
            self._accumulate(state, self._contribution(state, values), observed)
        return np.concatenate([state.evidence * observed, observed, [state.level]]).astype(np.float32), calibrating

    def _contribution(self, state: DetectorState, values: np.ndarray) -> np.ndarray:
        """c_j of this event (0 for a device's first event, which has no forecast); steps the model."""
        state.last = np.where(np.isnan(values), state.last, values)  # forward_fill of one row
        z = state.baseline.normalise(state.last)
        contribution = np.zeros(len(z)) if state.forecast is None else ((z - state.forecast) / self._scale) ** 2
        state.h, state.c, forecast = self._step(z, state.h, state.c)
        state.forecast = forecast.astype(np.float64)
        return contribution

    def _accumulate(self, state: DetectorState, contribution: np.ndarray, observed: np.ndarray) -> None:
        post = self._post
        evidence = np.minimum(contribution / state.weights, post.cap)
        state.evidence = np.where(observed, post.alpha * evidence + (1 - post.alpha) * state.evidence, state.evidence)

    def _calibrate(self, state: DetectorState) -> None:
        """Fits the baseline, replays the buffered events, fits weights and alarm level; causal."""
        rows = np.stack(state.buffer)
        state.buffer = None
        state.baseline = fit_baseline(forward_fill(rows))
        contributions = np.stack([self._contribution(state, row) for row in rows])
        skip = warm_up_events(len(rows))
        state.weights = np.maximum(contributions[skip:].mean(axis=0), self._post.floor)
        scores = []
        for row, contribution in zip(rows, contributions):
            observed = ~np.isnan(row)
            self._accumulate(state, contribution, observed)
            scores.append(np.max(state.evidence * observed))
        state.level = max(float(np.quantile(scores[skip:], self._post.quantile)), LEVEL_FLOOR)

