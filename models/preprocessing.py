"""Imputation and per-device normalisation, shared by training and streaming.

Training runs exactly this code over recorded sequences, so the model sees
inputs prepared the way the job prepares them one event at a time.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

# A device's calibrated std never falls below this share of the typical
# within-device std seen in training: a reading that happened to be flat
# during a short calibration must not turn ordinary variation into alarms.
MIN_STD_SHARE = 0.5


class FeaturePreprocessor:
    """One device's imputation and normalisation state.

    The first ``calibration_events`` events fit the device's baseline (mean and
    std of each reading); until then readings are normalised with the fleet
    reference from training. A missing reading is replaced by the device's
    last observed value, or by the baseline mean if it was never seen, and is
    flagged in the mask so it never counts towards the score.
    """

    __slots__ = ("_ref_mean", "_ref_std", "_calibration_events", "events_seen", "_last", "_count", "_mean", "_m2",
                 "_dev_mean", "_dev_std")

    def __init__(self, reference_mean: np.ndarray, reference_std: np.ndarray, calibration_events: int):
        n = len(reference_mean)
        self._ref_mean = reference_mean
        self._ref_std = reference_std
        self._calibration_events = calibration_events
        self.events_seen = 0
        self._last = np.full(n, np.nan)
        self._count = np.zeros(n)
        self._mean = np.zeros(n)
        self._m2 = np.zeros(n)
        self._dev_mean: Optional[np.ndarray] = None
        self._dev_std: Optional[np.ndarray] = None

    @property
    def calibrating(self) -> bool:
        return self.events_seen < self._calibration_events

    def _observe(self, values: np.ndarray, observed: np.ndarray) -> None:
        """Welford update of the baseline with this event's observed readings."""
        self._count += observed
        delta = np.where(observed, values - self._mean, 0.0)
        self._mean += delta / np.maximum(self._count, 1.0)
        self._m2 += delta * np.where(observed, values - self._mean, 0.0)

    def _freeze_baseline(self) -> None:
        seen = self._count > 0
        std = np.sqrt(self._m2 / np.maximum(self._count - 1.0, 1.0))
        self._dev_mean = np.where(seen, self._mean, self._ref_mean)
        self._dev_std = np.maximum(np.where(self._count > 1, std, self._ref_std), MIN_STD_SHARE * self._ref_std)

    def transform(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalised imputed inputs, observed mask) for one event's raw values (NaN = missing)."""
        observed = ~np.isnan(values)
        if self.calibrating:
            self._observe(values, observed)
        self.events_seen += 1
        if self._dev_mean is None and not self.calibrating:
            self._freeze_baseline()
        mean = self._ref_mean if self._dev_mean is None else self._dev_mean
        std = self._ref_std if self._dev_std is None else self._dev_std
        fallback = np.where(np.isnan(self._last), mean, self._last)
        filled = np.where(observed, values, fallback)
        self._last = filled
        return ((filled - mean) / std).astype(np.float32), observed.astype(np.float32)


def readings_vector(readings: Mapping[str, Optional[float]], features: Sequence[str]) -> np.ndarray:
    """The model's features in order, NaN where the event has no value."""
    return np.array([_as_float(readings.get(name)) for name in features], dtype=np.float64)


def _as_float(value: Optional[float]) -> float:
    return np.nan if value is None else float(value)
