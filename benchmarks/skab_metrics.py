"""SKAB's two leaderboards' metrics: point-wise F1/FAR/MAR and the NAB changepoint score.

Point-wise counts are pooled over the rows after calibration (SKAB's
protocol). The NAB score follows the Numenta Anomaly Benchmark: a window of
``window_ms`` right of each labelled change point; the first detection in a
window earns ``A_TP · σ(y)``, with y from -1 at the change point to 0 at the
window's end and σ(y) = 2 / (1 + e^{5y}) - 1, so earlier is worth more; a
window without one costs ``A_FN``; a detection outside every window costs
``A_FP · σ(y)`` with y measured from the end of the window before it (-A_FP
before the first window, or more than three window lengths after one).
Detections are the alarm's rising edges (an alarm held over many rows is one
detection). Scores are normalised per profile to 100 for a detector that
fires at every change point and 0 for one that never fires, pooled over
files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np

NAB_WINDOW_MS = 60_000


@dataclass
class Counts:
    """Point-wise confusion counts, pooled by adding."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        self.tp += int(np.sum(predicted & labels))
        self.fp += int(np.sum(predicted & ~labels))
        self.fn += int(np.sum(~predicted & labels))
        self.tn += int(np.sum(~predicted & ~labels))

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def f1(self) -> float:
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)

    @property
    def far(self) -> float:
        return 100.0 * self.fp / max(self.fp + self.tn, 1)

    @property
    def mar(self) -> float:
        return 100.0 * self.fn / max(self.fn + self.tp, 1)

    def row(self, name: str) -> str:
        return (f"| {name} | {self.f1:.3f} | {self.far:.2f} | {self.mar:.2f} | {self.tp} | {self.fp} | {self.fn} "
                f"| {self.tn} |")


class NabProfile(NamedTuple):
    name: str
    tp: float
    fp: float
    fn: float


NAB_PROFILES = (NabProfile("standard", 1.0, 0.11, 1.0), NabProfile("LowFP", 1.0, 0.22, 1.0),
                NabProfile("LowFN", 1.0, 0.11, 2.0))


def _sigma(y: float) -> float:
    return 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0


def nab_raw(times_ms: np.ndarray, alarms: np.ndarray, changepoints_ms: Iterable[int], profile: NabProfile,
            window_ms: int = NAB_WINDOW_MS) -> tuple[float, float, float]:
    """(score, null score, perfect score) of one file's alarms (bool per row at `times_ms`)."""
    windows = sorted((int(cp), int(cp) + window_ms) for cp in changepoints_ms)
    rising = np.flatnonzero(alarms & ~np.concatenate([[False], alarms[:-1]]))
    detections = times_ms[rising]
    score, hit = 0.0, [False] * len(windows)
    for t in detections:
        inside = [i for i, (start, end) in enumerate(windows) if start <= t <= end]
        if inside:
            i = inside[0]
            if not hit[i]:
                hit[i] = True
                start, end = windows[i]
                score += profile.tp * _sigma((t - end) / (end - start))
            continue
        before = [end for start, end in windows if end < t]
        y = (t - before[-1]) / window_ms if before else np.inf
        score += profile.fp * (_sigma(y) if y <= 3.0 else -1.0)
    score -= profile.fn * hit.count(False)
    return score, -profile.fn * len(windows), profile.tp * _sigma(-1.0) * len(windows)


def nab_scores(files: Iterable[tuple[np.ndarray, np.ndarray, Iterable[int]]]) -> dict[str, float]:
    """Normalised NAB score per profile, pooled over (times_ms, alarms, changepoints_ms) of each file."""
    files = list(files)
    result = {}
    for profile in NAB_PROFILES:
        raw = np.array([nab_raw(t, a, cps, profile) for t, a, cps in files]).sum(axis=0)
        result[profile.name] = 100.0 * (raw[0] - raw[1]) / max(raw[2] - raw[1], 1e-12)
    return result
