"""Scoring a recorded device offline with the job's own detector and head, no pipeline.

The job steps :class:`models.detector.DeviceDetector` once per event in the
per-device DoFn and reads the score out with :class:`models.lstm.ScoringHead`
in RunInference; this does the same for one device's rows in event order, so
benchmarks and cross-validation measure the job's numbers in seconds. (It
skips what DeviceLogic adds around the detector: the model roster, state
expiry and out-of-order events, none of which a recording in order has.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from models.detector import DeviceDetector
from models.lstm import ScoringHead


class DeviceScores(NamedTuple):
    """Per event: the score, the head's contributions, and whether it was a calibration event."""

    scores: np.ndarray
    contributions: np.ndarray
    calibrating: np.ndarray


def score_device(detector: DeviceDetector, raw: np.ndarray, head: ScoringHead | None = None) -> DeviceScores:
    """Streams one device's readings (events x features, NaN where missing) through the detector and the head."""
    state, rows, calibrating = detector.new_state(), [], []
    for values in raw:
        row, is_calibrating = detector.update(state, values)
        rows.append(row)
        calibrating.append(is_calibrating)
    with torch.no_grad():
        out = (head or ScoringHead())(torch.from_numpy(np.stack(rows))).numpy()
    return DeviceScores(out[:, 0].astype(np.float64), out[:, 1:], np.array(calibrating))
