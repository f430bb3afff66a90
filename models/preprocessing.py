"""Imputation and per-device normalisation, shared by training and streaming.

Training runs exactly these functions over recorded windows, so the model sees
inputs prepared the way the job prepares them one event at a time.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np


class Baseline(NamedTuple):
    """A device's normal level and spread per reading, fitted on its calibration events."""

    median: np.ndarray
    scale: np.ndarray

    def normalise(self, filled: np.ndarray) -> np.ndarray:
        """z-scores; a reading never observed yet (NaN after filling) sits at the baseline, z = 0.

        ``np.where`` rather than ``np.nan_to_num`` (a fifth of the per-event
        cost of this step): the values are the same, since what nan_to_num
        also does, turning ±inf into the largest float64, still gives ±inf
        in float32.
        """
        z = (filled - self.median) / self.scale
        return np.where(np.isnan(z), 0.0, z).astype(np.float32)


def fit_baseline(filled_rows: np.ndarray) -> Baseline:
    """Median and population std of each reading over forward-filled calibration rows.

    Median/std, not median/IQR: quantised sensors (flow, pressure) sit on two or
    three levels and their IQR is often 0. The scale is floored at a tiny share
    of the level so a flat reading cannot divide by zero.
    """
    with np.errstate(all="ignore"):
        median = np.nan_to_num(np.nanmedian(filled_rows, axis=0), nan=0.0)
        std = np.nan_to_num(np.nanstd(filled_rows, axis=0), nan=0.0)
    return Baseline(median, np.maximum(std, 1e-3 * np.abs(median) + 1e-6))


class Imputer(NamedTuple):
    """A device's missing readings from its present ones: the conditional mean under its calibration covariance.

    A missing reading must enter the model as something consistent with the
    readings that did arrive. Forward-filled, it is a stuck sensor to the
    LSTM, which then mis-forecasts the readings that depend on it; imputed by
    its own forecast, the forecast runs free and drifts off (in the simulator
    a 100-event gap of pressure walked 7 sigma away and alarmed). The
    Gaussian conditional mean ``μ_M + Σ_MO Σ_OO⁻¹ (z_O − μ_O)`` uses this
    event's present readings, for any pattern of gaps, with a small ridge so
    quantised or flat readings cannot make Σ singular. The detector blends it
    with the forecast, which is the better guess early in a gap.
    """

    centre: np.ndarray
    covariance: np.ndarray

    def impute(self, z: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """`z` (float32) with its missing entries replaced by their conditional mean given the rest."""
        present = ~missing
        filled = z.astype(np.float64)
        deviation = filled[present] - self.centre[present]
        weights = np.linalg.solve(self.covariance[np.ix_(present, present)], deviation) if deviation.size else deviation
        filled[missing] = self.centre[missing] + self.covariance[np.ix_(missing, present)] @ weights
        return filled.astype(np.float32)


IMPUTER_RIDGE = 1e-2  # in z units: a tenth of a calibration sigma of noise added to every reading


def fit_imputer(z_rows: np.ndarray) -> Imputer:
    """Mean and (ridged) covariance of a device's normalised, forward-filled calibration rows."""
    centre = z_rows.mean(axis=0)
    covariance = np.cov(z_rows, rowvar=False, bias=True).reshape(len(centre), len(centre))
    return Imputer(centre, covariance + IMPUTER_RIDGE * np.eye(len(centre)))


def forward_fill(rows: np.ndarray, last: Optional[np.ndarray] = None) -> np.ndarray:
    """Each missing (NaN) reading replaced by the last observed one; NaN until a first observation."""
    filled = np.array(rows, dtype=np.float64)
    previous = np.full(filled.shape[1], np.nan) if last is None else last
    for row in filled:
        missing = np.isnan(row)
        row[missing] = previous[missing]
        previous = row
    return filled


def readings_vector(readings: Mapping[str, Optional[float]], features: Sequence[str]) -> np.ndarray:
    """The model's features in order, NaN where the event has no value."""
    return np.array([_as_float(readings.get(name)) for name in features], dtype=np.float64)


def _as_float(value: Optional[float]) -> float:
    return np.nan if value is None else float(value)
