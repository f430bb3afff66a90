"""One device's detector: calibration, imputation, the recurrent step, and three kinds of evidence per reading.

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
at the last one the device fits its baseline (median/std) and its imputer
(mean and covariance of the forward-filled calibration z), replays the buffer
through the model from a zero state, and fits its residual weights, alarm
level and stuck limits from the replay. Until then its rows have alarm level
0, which the head scores 0. After that, per event and reading j (observed
readings only: an imputed reading adds no evidence and moves nothing):

- *residual* (dynamics): the forecast residual ``e_j = (z_j - ẑ_j)/r_j``
  less its own recent mean (EWMA, ``residual_centre_span``), squared,
  divided by its calibration mean (floored), capped, smoothed (EWMA,
  ``ewma_span``): ``R_j``. Re-centring keeps a level change out of it (a
  reading forecast around its level would otherwise show any level move as
  a lasting residual); it sees changed dynamics, added noise and spikes;
- *level*: ``m_j``, an EWMA (``level_span``) of z, against a reference
  ``ref_j`` that follows m slowly (EWMA, ``level_reference_span``) and holds
  while reading j's evidence is above the threshold (for at most
  ``level_hold`` events), in units of ``s_j``,
  the widest post-calibration wander of that reading among the training
  devices (models/train.py: level_scale):
  ``L_j = min(max(|m_j - ref_j|/s_j - level_deadband, 0)², cap)``. A change
  faster than the reference alarms and keeps alarming until the reading
  returns to where it was; wander slower than the reference is absorbed
  (measured from the calibration instead, the level alone alarmed on 44 %
  of the rows of SKAB's anomaly-free file cut into file-sized devices);
- *stuck*: ``k_j``, the events reading j has repeated its value exactly, in
  units of its limit ``STUCK_MULTIPLE · (longest repeat in calibration +
  stuck_margin)`` (a coarsely quantised reading repeats in calibration too,
  and gets a longer limit): ``S_j = min((k_j / limit_j)², cap)``.

The evidence of reading j is ``E_j = residual_weight · R_j + level · (L_j +
S_j)``, ``level`` the 0.99 quantile of the device's calibration
``max_j R_j``; the head divides by ``level``, so L and S alarm on their own
above ``factor`` whatever the device's residual noise. Contributions (the
head's shares of ΣE_j) cover all three.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from torch import nn

from models.lstm import numpy_step
from models.preprocessing import Baseline, Imputer, fit_baseline, fit_imputer, forward_fill

LEVEL_FLOOR = 1e-6
GAP_DECAY = 0.8  # weight of the forecast in a missing reading's imputation, per event of the gap
STUCK_MULTIPLE = 2.0  # a repeat twice as long as any in calibration (plus the margin) is a stuck reading


@dataclass(frozen=True)
class PostProcessing:
    """How residuals, levels and repeats become per-device evidence and an alarm level (stored in the artifact).

    ``factor`` times the ``quantile`` of the device's calibration residual
    scores is its alarm threshold; the first eighth of calibration is warm-up
    and is left out of the weights and the quantile. The rest is described in
    the module docstring; ``benchmarks/skab_cv.py`` chooses ``ewma_span``,
    ``factor`` and ``level_reference_span`` by leave-files-out
    cross-validation, the others are the design's.
    """

    ewma_span: int = 45
    cap: float = 10.0
    floor: float = 0.5
    quantile: float = 0.99
    factor: float = 1.5
    level_span: int = 45
    # 0 on SKAB (half a level scale cost valve1's F1 0.11); the simulated line's bundled model uses 0.25
    level_deadband: float = 0.0
    level_reference_span: int = 300
    # events of an alarm the reference holds for: longer than SKAB's anomalies (400 rows; 300 raised valve1's FAR
    # to 13 %)
    level_hold: int = 600
    # the residual's share: 1 let the anomaly-free segments alarm on 23 % of rows, 0 lost valve1 F1 0.04
    residual_weight: float = 0.5
    residual_centre_span: int = 30
    stuck_margin: float = 5.0  # events added to the longest calibration repeat before doubling it

    @property
    def alpha(self) -> float:
        return ewma_alpha(self.ewma_span)

    @property
    def level_alpha(self) -> float:
        return ewma_alpha(self.level_span)

    def as_dict(self) -> dict:
        return asdict(self)


def ewma_alpha(span: int) -> float:
    """The smoothing weight of an EWMA of `span` events (pandas' convention)."""
    return 2.0 / (span + 1.0)


def warm_up_events(calibration_events: int) -> int:
    return calibration_events // 8


_PACKED = "packed-3"  # marks DetectorState's pickled form below
# Older packed forms, and how many per-feature arrays lead their float bytes; they still load, the statistics
# they lack start afresh (no served model uses them: the artifact's state signature changed with each).
_PACKED_BEFORE = {"packed-2": ("weights", "evidence", "mean", "gap")}
_PACKED_BEFORE_LEVEL = "packed-1"  # the form before the level statistic and the imputer
_SLOTS_BEFORE_LEVEL = ("events_seen", "buffer", "baseline", "last", "h", "c", "forecast", "weights", "level",
                       "evidence")
_ARRAYS = ("weights", "evidence", "mean", "gap", "reference", "held", "centre", "repeats", "last_value", "stuck_limit")


class DetectorState:
    """Everything one device's detector keeps between events; picklable, a few hundred floats.

    It pickles compactly (Beam keeps it with PickleCoder and encodes it per
    device and bundle): every float64 array, calibration buffer included, is
    packed into one byte string, h and c into another, so the cost does not
    grow with a pickle header per array: about a quarter of the time of
    pickling each array (60 us -> 15 us for a state with a full calibration
    buffer). Values round-trip exactly; the arrays come back as views of one
    writable array per dtype. Arrays of other dtypes than the detector makes
    are pickled one value per slot. States pickled by earlier versions still
    load (see _PACKED_BEFORE).
    """

    __slots__ = ("events_seen", "buffer", "baseline", "imputer", "h", "c", "forecast", "level", *_ARRAYS)

    def __init__(self, n_features: int, hidden_size: int):
        self.events_seen = 0
        self.buffer: Optional[list[np.ndarray]] = []
        self.baseline: Optional[Baseline] = None
        self.imputer: Optional[Imputer] = None
        self.h = np.zeros(hidden_size, dtype=np.float32)
        self.c = np.zeros(hidden_size, dtype=np.float32)
        self.forecast: Optional[np.ndarray] = None
        self.level = 0.0
        self._fresh_arrays(n_features)

    def _fresh_arrays(self, n: int) -> None:
        self.weights = np.ones(n)
        self.evidence = np.zeros(n)  # R_j, the residual evidence
        self.mean = np.zeros(n)  # m_j, the smoothed level in calibration units (z)
        self.gap = np.zeros(n)  # events each reading has been missing for, up to this one
        self.reference = np.zeros(n)  # ref_j, the level m_j is measured from
        self.held = np.zeros(n)  # events reading j has alarmed in a row (its reference holds for level_hold of them)
        self.centre = np.zeros(n)  # the residual's recent mean, taken off before squaring
        self.repeats = np.zeros(n)  # k_j, events the reading has repeated its last observed value
        self.last_value = np.full(n, np.nan)  # the last observed raw value
        self.stuck_limit = np.full(n, np.inf)  # repeats that make S_j = 1

    def __getstate__(self):
        arrays = [getattr(self, name) for name in _ARRAYS]
        if self.forecast is not None:
            arrays.append(self.forecast)
        if self.baseline is not None:
            arrays += [self.baseline.median, self.baseline.scale, self.imputer.centre, self.imputer.covariance.ravel()]
        if self.buffer:
            arrays += self.buffer
        if any(a.dtype != np.float64 for a in arrays) or self.h.dtype != np.float32 or self.c.dtype != np.float32:
            return tuple(getattr(self, name) for name in self.__slots__)  # other dtypes: as they are
        return (_PACKED, self.events_seen, self.level, len(self.weights),
                None if self.buffer is None else len(self.buffer), self.forecast is not None,
                self.baseline is not None, np.concatenate(arrays).tobytes(), np.concatenate([self.h, self.c]).tobytes())

    def __setstate__(self, values):
        if values[0] == _PACKED_BEFORE_LEVEL or len(values) == len(_SLOTS_BEFORE_LEVEL):
            self._set_state_before_level(values)
        elif values[0] != _PACKED and values[0] not in _PACKED_BEFORE:
            for name, value in zip(self.__slots__, values):
                setattr(self, name, value)
        else:
            form, self.events_seen, self.level, n, rows, has_forecast, has_baseline, floats, hidden = values
            names = _PACKED_BEFORE.get(form, _ARRAYS)
            x = np.frombuffer(floats, dtype=np.float64).copy()
            self._set_hidden(hidden)
            self._fresh_arrays(n)
            for i, name in enumerate(names):
                setattr(self, name, x[i * n : (i + 1) * n])
            at = len(names) * n
            self.forecast = None
            if has_forecast:
                self.forecast, at = x[at : at + n], at + n
            self.baseline = self.imputer = None
            if has_baseline:
                self.baseline, at = Baseline(x[at : at + n], x[at + n : at + 2 * n]), at + 2 * n
                self.imputer = Imputer(x[at : at + n], x[at + n : at + n + n * n].reshape(n, n))
                at += n + n * n
            self.buffer = None if rows is None else [x[at + i * n : at + (i + 1) * n] for i in range(rows)]

    def _set_hidden(self, hidden: bytes) -> None:
        hc = np.frombuffer(hidden, dtype=np.float32).copy()
        self.h, self.c = hc[: len(hc) // 2], hc[len(hc) // 2 :]

    def _set_state_before_level(self, values: tuple) -> None:
        if values[0] != _PACKED_BEFORE_LEVEL:
            old = dict(zip(_SLOTS_BEFORE_LEVEL, values))
            n = len(old["weights"])
        else:
            _, events_seen, level, n, rows, has_forecast, has_baseline, floats, hidden = values
            x = np.frombuffer(floats, dtype=np.float64).copy()
            old = {"events_seen": events_seen, "level": level, "weights": x[n : 2 * n], "evidence": x[2 * n : 3 * n],
                   "forecast": None, "baseline": None}
            at = 3 * n
            if has_forecast:
                old["forecast"], at = x[at : at + n], at + n
            if has_baseline:
                old["baseline"], at = Baseline(x[at : at + n], x[at + n : at + 2 * n]), at + 2 * n
            old["buffer"] = None if rows is None else [x[at + i * n : at + (i + 1) * n] for i in range(rows)]
            self._set_hidden(hidden)
        self._fresh_arrays(n)
        for name in ("events_seen", "level", "weights", "evidence", "forecast", "baseline", "buffer", "h", "c"):
            if name in old:
                setattr(self, name, old[name])
        self.imputer = None if self.baseline is None else Imputer(np.zeros(n), np.eye(n))


class DeviceDetector:
    """The per-device logic around one (possibly int8) :class:`models.lstm.RecurrentStep`.

    ``residual_scale`` (r_j) and ``level_scale`` (s_j) come from training
    (:meth:`models.artifact.ModelArtifact.detector` builds one from an artifact).
    """

    def __init__(self, step: nn.Module, residual_scale: np.ndarray, post: PostProcessing, calibration_events: int,
                 level_scale: Optional[np.ndarray] = None):
        self._step = numpy_step(step)
        self._scale = np.asarray(residual_scale, dtype=np.float64)
        self._level_scale = np.ones(len(self._scale)) if level_scale is None else np.asarray(level_scale, np.float64)
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
            evidence = self._evidence(state)
        else:
            residual, z = self._residual(state, values)
            self._accumulate(state, self._centred(state, residual, observed), z, values, observed)
            evidence = self._evidence(state)
            self._follow_reference(state, evidence, observed)
        row = np.concatenate([evidence * observed, observed, [state.level]]).astype(np.float32)
        return row, calibrating

    def level_evidence(self, state: DetectorState) -> np.ndarray:
        """L_j: how far each reading's smoothed level is from its reference, beyond the dead band (docstring)."""
        beyond = np.abs(state.mean - state.reference) / self._level_scale - self._post.level_deadband
        return np.minimum(np.maximum(beyond, 0.0) ** 2, self._post.cap)

    def stuck_evidence(self, state: DetectorState) -> np.ndarray:
        """S_j: how long each reading has repeated its value, in units of its limit (docstring)."""
        return np.minimum((state.repeats / state.stuck_limit) ** 2, self._post.cap)

    def _evidence(self, state: DetectorState) -> np.ndarray:
        """E_j = w·R_j + level·(L_j + S_j): in the head's units (÷ level), L and S alarm on their own."""
        return (self._post.residual_weight * state.evidence
                + state.level * (self.level_evidence(state) + self.stuck_evidence(state)))

    def _residual(self, state: DetectorState, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """e_j of this event (0 for a device's first event, which has no forecast) and z; steps the model.

        A missing reading enters the model as a blend of its forecast and its
        conditional mean given the present readings (models.preprocessing.
        Imputer), the forecast's weight GAP_DECAY^g at the g-th event of a gap.
        The forecast is the best guess for one event (a reading forecast by
        its last value stays there; conditional means alone raised the
        simulated line's fault-free alarm rate from 0.71 % to 0.83 % at 1 %
        missing readings, and its recall on faults from 0.45 to 0.34), but fed back for many events it runs free (a
        100-event pressure gap walked 7 sigma off and alarmed); the
        conditional mean keeps a long gap consistent with the other readings.
        """
        missing = np.isnan(values)
        z = state.baseline.normalise(values)
        if missing.any():
            conditional = state.imputer.impute(z, missing)
            if state.forecast is not None:
                weight = GAP_DECAY ** (state.gap + 1)
                conditional = np.where(missing, weight * state.forecast + (1 - weight) * conditional, conditional)
            z = conditional.astype(np.float32)
        residual = np.zeros(len(z)) if state.forecast is None else (z - state.forecast) / self._scale
        state.gap = np.where(missing, state.gap + 1, 0.0)
        state.h, state.c, forecast = self._step(z, state.h, state.c)
        state.forecast = forecast.astype(np.float64)
        return residual, z

    def _centred(self, state: DetectorState, residual: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """The squared residual less its recent mean (observed readings move the mean)."""
        centred = residual - state.centre
        a = ewma_alpha(self._post.residual_centre_span)
        state.centre = np.where(observed, a * residual + (1 - a) * state.centre, state.centre)
        return centred**2

    def _accumulate(self, state: DetectorState, squared: np.ndarray, z: np.ndarray, values: np.ndarray,
                    observed: np.ndarray) -> None:
        post = self._post
        evidence = np.minimum(squared / state.weights, post.cap)
        state.evidence = np.where(observed, post.alpha * evidence + (1 - post.alpha) * state.evidence, state.evidence)
        state.mean = np.where(observed, post.level_alpha * z + (1 - post.level_alpha) * state.mean, state.mean)
        state.repeats = np.where(observed, np.where(values == state.last_value, state.repeats + 1, 0.0),
                                 state.repeats)
        state.last_value = np.where(observed, values, state.last_value)

    def _follow_reference(self, state: DetectorState, evidence: np.ndarray, observed: np.ndarray) -> None:
        """ref_j moves toward m_j, except in the first level_hold events of an alarm of reading j.

        Held for good, a change of operating point (or the end of a fault that
        was there during calibration) would alarm for ever; after the hold the
        reference follows, and the alarm fades within a reference span.
        """
        alarming = observed & (evidence > self._post.factor * state.level)
        state.held = np.where(alarming, state.held + 1, np.where(observed, 0.0, state.held))
        holding = alarming & (state.held <= self._post.level_hold)
        self._move_reference(state, observed & ~holding)

    def _move_reference(self, state: DetectorState, moving: np.ndarray) -> None:
        """ref_j one EWMA step (level_reference_span) toward m_j, for the readings in `moving`."""
        a = ewma_alpha(self._post.level_reference_span)
        state.reference = np.where(moving, a * state.mean + (1 - a) * state.reference, state.reference)

    def _calibrate(self, state: DetectorState) -> None:
        """Fits the baseline, replays the buffered events, fits weights, alarm level and stuck limits; causal.

        The alarm level is fitted on the residual evidence alone: the level
        and stuck statistics have their own scales. The reference follows the
        level through calibration (nothing holds it: no alarms yet).
        """
        rows = np.stack(state.buffer)
        state.buffer = None
        filled = forward_fill(rows)
        state.baseline = fit_baseline(filled)
        state.imputer = fit_imputer(state.baseline.normalise(filled))
        replayed = [self._residual(state, row) for row in rows]
        squared = np.stack([self._centred(state, residual, ~np.isnan(row))
                            for row, (residual, _) in zip(rows, replayed)])
        skip = warm_up_events(len(rows))
        state.weights = np.maximum(squared[skip:].mean(axis=0), self._post.floor)
        scores, longest = [], np.zeros(len(state.weights))
        for row, s, (_, z) in zip(rows, squared, replayed):
            observed = ~np.isnan(row)
            self._accumulate(state, s, z, row, observed)
            self._move_reference(state, observed)
            longest = np.maximum(longest, state.repeats)
            scores.append(np.max(state.evidence * observed))
        state.level = max(float(np.quantile(scores[skip:], self._post.quantile)), LEVEL_FLOOR)
        state.stuck_limit = STUCK_MULTIPLE * (longest + self._post.stuck_margin)
