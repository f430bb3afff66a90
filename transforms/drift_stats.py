"""Drift statistics of one feature in one window, from a small mergeable summary.

A window's values are never kept. :class:`WindowSummary` holds counts in the
reference's fixed bins (10 decile bins for the PSI, 100 percentile bins for
the KS statistic) and, per device, count, mean and squared deviations (Chan's
parallel update), so summaries merge exactly and their size depends on the
number of bins and devices, not on the number of events.

* PSI = sum over decile bins of (a - e) * ln(a / e), the window's share ``a``
  against the training share ``e``, both floored at ``PSI_EPSILON`` = 1e-4 so
  an empty bin adds a finite amount (at most about 0.1 * ln(0.1 / 1e-4) = 0.69).
* KS: the largest gap between the window's and the training CDF, checked at
  the 99 training percentiles. Checking at fixed points can only miss part of
  the true gap (by at most one bin's share), so the p-value errs on the side of
  "no drift".
* The KS p-value is scipy's exact one-sample distribution (``kstwo``) at the
  window's *effective* sample size. Readings of one device within a minute are
  strongly correlated (load cycles, thermal lag), so a fleet window of n
  readings carries the information of far fewer independent draws; with n the
  test flags every unshifted window of the simulated line (p < 1e-18). The
  effective size is Kish's design effect for cluster samples:
  ``n / (1 + (m - 1) * icc)``, with ``m`` the size-weighted mean readings per
  device and ``icc`` the ANOVA intra-class correlation between devices. For
  independent readings it is about n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional, Sequence

import numpy as np

from models.drift_reference import FeatureReference

PSI_EPSILON = 1e-4


class Moments:
    """Count, mean and sum of squared deviations, mergeable (Chan et al.)."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self, n: int = 0, mean: float = 0.0, m2: float = 0.0):
        self.n, self.mean, self.m2 = n, mean, m2

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    def merge(self, other: Moments) -> None:
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.m2 += other.m2 + delta * delta * self.n * other.n / n
        self.mean += delta * other.n / n
        self.n = n

    def __getstate__(self):
        return self.n, self.mean, self.m2

    def __setstate__(self, state):
        self.n, self.mean, self.m2 = state


_NO_IDS = np.empty(0, dtype="S1")


class DeviceIndex:
    """The device ids of a batch of values, numbered in order of first appearance and sorted once.

    Every feature of a batch of events has the same devices, so the drift
    value step numbers them once for all features (:meth:`WindowSummary.add_column`).
    """

    def __init__(self, device_ids: Sequence[str]):
        numbers: dict[str, int] = {}
        self.group = np.array([numbers.setdefault(d, len(numbers)) for d in device_ids], dtype=np.intp)
        self.ids = np.array([d.encode() for d in numbers], dtype=bytes)
        self.order = np.argsort(self.ids, kind="stable")


@dataclass
class WindowSummary:
    """One feature's values in one window, as bin counts and per-device moments.

    The per-device moments are kept as arrays, not a dict of
    :class:`Moments`: ``device_ids`` (sorted UTF-8 bytes) and, aligned with
    it, ``device_n``, ``device_mean``, ``device_m2``. Streaming keeps open
    windows in Beam state, which weighs every value it writes object by
    object (objsize) and pickles it: with a dict, a window of 1,000 devices
    cost about 10 ms per feature and bundle, with arrays about 0.1 ms.
    Merges apply Chan's update elementwise with the same operations as
    :meth:`Moments.merge`. ``devices`` gives the dict view.
    """

    psi_counts: np.ndarray
    ks_counts: np.ndarray
    events: int = 0
    missing: int = 0
    device_ids: np.ndarray = field(default_factory=lambda: _NO_IDS)
    device_n: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    device_mean: np.ndarray = field(default_factory=lambda: np.empty(0))
    device_m2: np.ndarray = field(default_factory=lambda: np.empty(0))

    @classmethod
    def empty(cls, reference: FeatureReference) -> WindowSummary:
        return cls(np.zeros(len(reference.psi_edges) + 1, np.int64), np.zeros(len(reference.ks_edges) + 1, np.int64))

    @property
    def devices(self) -> dict[str, Moments]:
        """Each device's moments (a copy), by device id in sorted order."""
        return {i.decode(): Moments(n, mean, m2) for i, n, mean, m2 in zip(
            self.device_ids.tolist(), self.device_n.tolist(), self.device_mean.tolist(), self.device_m2.tolist())}

    def add(self, reference: FeatureReference, device_id: str, value: Optional[float]) -> None:
        """One value; :meth:`add_many` for more than a few."""
        self.add_many(reference, [device_id], [value])

    def add_many(self, reference: FeatureReference, device_ids: list[str], values: list[Optional[float]]) -> None:
        """Values with their device ids: exact counts and bins; each device's moments of these values come
        from two-pass sums and are merged in (Chan), equal to adding them one by one up to float rounding.
        """
        x = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
        self.add_column(reference, DeviceIndex(device_ids), x)

    def add_column(self, reference: FeatureReference, devices: DeviceIndex, x: np.ndarray) -> None:
        """:meth:`add_many` with the device ids numbered already (NaN: missing), for several features at once."""
        observed = ~np.isnan(x)
        self.events += len(x)
        self.missing += int(len(x) - np.count_nonzero(observed))
        if not observed.any():
            return
        x = x[observed]
        self.psi_counts += np.bincount(np.searchsorted(reference.psi_edges, x, side="right"),
                                       minlength=len(self.psi_counts))
        self.ks_counts += np.bincount(np.searchsorted(reference.ks_edges, x, side="right"),
                                      minlength=len(self.ks_counts))
        group = devices.group[observed]
        counts = np.bincount(group, minlength=len(devices.ids))
        present = counts > 0
        means = np.zeros(len(counts))
        np.divide(np.bincount(group, weights=x, minlength=len(counts)), counts, out=means, where=present)
        m2 = np.bincount(group, weights=(x - means[group]) ** 2, minlength=len(counts))
        keep = devices.order[present[devices.order]]  # the devices with values here, by id
        self._merge_moments(devices.ids[keep], counts[keep], means[keep], m2[keep])

    def merge(self, other: WindowSummary) -> WindowSummary:
        self.events += other.events
        self.missing += other.missing
        self.psi_counts += other.psi_counts
        self.ks_counts += other.ks_counts
        self._merge_moments(other.device_ids, other.device_n, other.device_mean, other.device_m2)
        return self

    def _merge_moments(self, ids: np.ndarray, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merges per-device moments (ids sorted and unique) into this summary's, as Moments.merge does."""
        if not len(ids):
            return
        if not len(self.device_ids):
            self.device_ids, self.device_n, self.device_mean, self.device_m2 = ids, n.copy(), mean.copy(), m2.copy()
            return
        union = np.union1d(self.device_ids, ids)
        mine, theirs = np.searchsorted(union, self.device_ids), np.searchsorted(union, ids)
        na, ma, sa = np.zeros(len(union), np.int64), np.zeros(len(union)), np.zeros(len(union))
        nb, mb, sb = np.zeros(len(union), np.int64), np.zeros(len(union)), np.zeros(len(union))
        na[mine], ma[mine], sa[mine] = self.device_n, self.device_mean, self.device_m2
        nb[theirs], mb[theirs], sb[theirs] = n, mean, m2
        total = na + nb
        delta = mb - ma
        self.device_ids, self.device_n = union, total
        self.device_m2 = sa + (sb + delta * delta * na * nb / total)
        self.device_mean = ma + delta * nb / total

    def pooled(self) -> Moments:
        """All devices' values as one group (Chan's formula over the devices at once)."""
        n = int(self.device_n.sum())
        if not n:
            return Moments()
        mean = float(np.sum(self.device_n * self.device_mean) / n)
        m2 = float(np.sum(self.device_m2) + np.sum(self.device_n * (self.device_mean - mean) ** 2))
        return Moments(n, mean, m2)

    def __setstate__(self, state: dict) -> None:
        """Also loads summaries pickled with a ``devices`` dict of Moments (before the arrays)."""
        devices = state.pop("devices", None)
        self.__dict__.update(state)
        if devices is not None:
            self.device_ids, self.device_n, self.device_mean, self.device_m2 = _NO_IDS, *_no_moments()
            ids = sorted(devices)
            self._merge_moments(np.array([i.encode() for i in ids], dtype=bytes),
                                np.array([devices[i].n for i in ids], np.int64),
                                np.array([devices[i].mean for i in ids]), np.array([devices[i].m2 for i in ids]))


def _no_moments() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0), np.empty(0)


def psi(counts: np.ndarray, proportions: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of bin counts against reference shares."""
    actual = np.maximum(counts / max(counts.sum(), 1), epsilon)
    expected = np.maximum(np.asarray(proportions, dtype=np.float64), epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_statistic(counts: np.ndarray, reference_cdf: np.ndarray) -> float:
    """Largest gap between the window's CDF and the reference CDF at the reference's edges."""
    window_cdf = np.cumsum(counts)[:-1] / max(counts.sum(), 1)
    return float(np.max(np.abs(window_cdf - np.asarray(reference_cdf)), initial=0.0))


def ks_pvalue(statistic: float, n_effective: float) -> float:
    """scipy's exact one-sample KS survival function at a (rounded) effective sample size."""
    return float(load_scipy_stats().kstwo.sf(statistic, max(1, round(n_effective))))


def load_scipy_stats() -> ModuleType:
    """scipy.stats, imported when first needed rather than with this module.

    Importing it takes 0.6-0.9 s. Every process of the job imports this
    module, but only those that close drift windows need scipy: the scoring
    processes of a --local_processes job never do, and its launcher's
    imports delay every scoring process's start. Steps that close windows
    call this in setup(), so the import never stalls a running bundle.
    """
    from scipy import stats

    return stats


def effective_sample_size(devices: dict[str, Moments]) -> float:
    """Kish's n / (1 + (m - 1) * icc), with the ANOVA intra-class correlation over devices."""
    groups = [m for m in devices.values() if m.n > 0]
    return _effective_sample_size(np.array([m.n for m in groups], dtype=np.float64),
                                  np.array([m.mean for m in groups]), np.array([m.m2 for m in groups]))


def _effective_sample_size(sizes: np.ndarray, means: np.ndarray, m2: np.ndarray) -> float:
    """effective_sample_size over aligned arrays of devices' counts (all > 0), means and m2."""
    n, k = sizes.sum(), len(sizes)
    if k < 2 or n <= k:
        return float(n)
    grand = float(np.sum(sizes * means) / n)
    within = float(np.sum(m2)) / (n - k)
    between = float(np.sum(sizes * (means - grand) ** 2)) / (k - 1)
    n0 = (n - np.sum(sizes**2) / n) / (k - 1)
    between_var = max(0.0, (between - within) / n0)
    icc = between_var / (between_var + within) if between_var + within > 0 else 0.0
    mean_cluster = float(np.sum(sizes**2) / n)
    return float(n / (1.0 + (mean_cluster - 1.0) * icc))


@dataclass(frozen=True)
class DriftThresholds:
    """When a window counts as drifted; see the module docstring and the README for the defaults."""

    psi: float = 3.0
    ks_pvalue: float = 1e-6
    min_values: int = 50


def reproducible(value: float, digits: int = 10) -> float:
    """`value` to `digits` significant digits: the same whatever order partial summaries were merged in.

    Per-device moments are merged by Chan's update in the order partials
    arrive, and which values share a partial depends on how the runner cut
    bundles, so mean, std and the effective sample size differ between runs
    in their last bits (seen: 114.16372862453532 against ...531). Counts, PSI
    and the KS statistic are exact; the float statistics are reported to 10
    digits, so runs over the same events write byte-identical records.
    """
    return value if not math.isfinite(value) else float(f"{value:.{digits}g}")


def drift_statistics(summary: WindowSummary, reference: FeatureReference, thresholds: DriftThresholds) -> dict:
    """The DriftStatistics fields that depend on the data (not window, feature or model)."""
    pooled = summary.pooled()
    observed = pooled.n
    psi_value = psi(summary.psi_counts, np.asarray(reference.psi_proportions)) if observed else math.nan
    ks_value = ks_statistic(summary.ks_counts, np.asarray(reference.ks_cdf)) if observed else 0.0
    n_effective = _effective_sample_size(summary.device_n.astype(np.float64), summary.device_mean, summary.device_m2)
    p_value = reproducible(ks_pvalue(ks_value, n_effective)) if observed else 1.0
    enough = observed >= thresholds.min_values
    return {
        "count": summary.events,
        "missing_rate": summary.missing / summary.events if summary.events else 0.0,
        "mean": reproducible(pooled.mean) if observed else math.nan,
        "std": reproducible(math.sqrt(pooled.m2 / observed)) if observed else math.nan,
        "reference_mean": reference.mean,
        "reference_std": reference.std,
        "psi": psi_value,
        "ks_statistic": ks_value,
        "ks_pvalue": p_value,
        "drift": bool(enough and (psi_value > thresholds.psi or p_value < thresholds.ks_pvalue)),
    }
