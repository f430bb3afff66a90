"""Drift statistics against numpy/scipy oracles, and the reference file's round trip."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from scipy import stats

from models.drift_reference import SCORE_FEATURE, bin_index, build_reference, load_reference, save_reference
from transforms.drift_stats import (
    PSI_EPSILON,
    DriftThresholds,
    Moments,
    WindowSummary,
    drift_statistics,
    effective_sample_size,
    ks_statistic,
    psi,
)

RNG = np.random.default_rng(0)
TRAINING = RNG.normal(10.0, 2.0, 20_000)
REFERENCE = build_reference("v-test", ("x",), TRAINING[:, None], RNG.gamma(2.0, 0.5, 5_000)).features["x"]


def summary_of(values, devices=None) -> WindowSummary:
    summary = WindowSummary.empty(REFERENCE)
    for i, v in enumerate(values):
        summary.add(REFERENCE, f"d{i % 7 if devices is None else devices[i]}", v)
    return summary


def test_reference_bins_hold_the_training_shares_and_cdf():
    assert len(REFERENCE.psi_edges) == 9 and len(REFERENCE.ks_edges) == 99
    np.testing.assert_allclose(REFERENCE.psi_proportions, 0.1, atol=1e-4)
    np.testing.assert_allclose(REFERENCE.ks_cdf, [np.mean(TRAINING < e) for e in REFERENCE.ks_edges])
    assert REFERENCE.mean == pytest.approx(TRAINING.mean()) and REFERENCE.std == pytest.approx(TRAINING.std())


def test_reference_file_round_trip(tmp_path):
    reference = build_reference("v-test", ("x", "empty"), np.c_[TRAINING, np.full(len(TRAINING), np.nan)],
                                np.arange(100.0))
    save_reference(tmp_path, reference)
    assert load_reference(tmp_path) == reference
    assert set(reference.features) == {"x", SCORE_FEATURE}  # a reading never observed has no reference
    assert load_reference(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("shift", [0.0, 0.5, 3.0])
def test_psi_matches_the_formula_on_numpy_histograms(shift):
    window = RNG.normal(10.0 + shift * 2.0, 2.0, 1_000)
    counts = np.histogram(window, bins=[-np.inf, *REFERENCE.psi_edges, np.inf])[0]
    a = np.maximum(counts / counts.sum(), PSI_EPSILON)
    e = np.maximum(np.asarray(REFERENCE.psi_proportions), PSI_EPSILON)
    expected = np.sum((a - e) * np.log(a / e))
    assert psi(summary_of(window).psi_counts, np.asarray(REFERENCE.psi_proportions)) == pytest.approx(expected)


def test_bins_of_the_summary_and_of_the_reference_agree_on_edges():
    edges = REFERENCE.ks_edges
    values = np.array([edges[0], edges[5], np.nextafter(edges[5], -np.inf), -1e9, 1e9])
    summary = summary_of(values)
    assert np.array_equal(np.flatnonzero(summary.ks_counts), np.unique(bin_index(edges, values)))


@pytest.mark.parametrize("shift", [0.0, 0.2, 1.0])
def test_binned_ks_bounds_scipys_two_sample_statistic(shift):
    window = RNG.normal(10.0 + shift * 2.0, 2.0, 2_000)
    binned = ks_statistic(summary_of(window).ks_counts, np.asarray(REFERENCE.ks_cdf))
    exact = stats.ks_2samp(window, TRAINING).statistic
    # Checked only at the percentiles: never more than the exact gap, short of it by at most one bin's share.
    assert binned <= exact + 1e-12
    assert exact - binned <= 0.02


def test_pvalue_of_independent_readings_matches_scipys_kstest():
    window = RNG.normal(10.3, 2.0, 800)
    record = drift_statistics(summary_of(window, devices=list(range(800))), REFERENCE, DriftThresholds())
    exact = stats.kstest(window, stats.norm(10.0, 2.0).cdf)
    assert record["ks_statistic"] == pytest.approx(exact.statistic, abs=0.015)
    assert record["ks_pvalue"] == pytest.approx(stats.kstwo.sf(record["ks_statistic"], 800))


def test_effective_sample_size_is_n_for_independent_readings_and_the_devices_for_clustered_ones():
    independent = summary_of(RNG.normal(10, 2, 2_000), devices=[i % 20 for i in range(2_000)])
    assert effective_sample_size(independent.devices) == pytest.approx(2_000, rel=0.1)
    levels = RNG.normal(10, 2, 20)
    clustered = [levels[i % 20] + RNG.normal(0, 0.01) for i in range(2_000)]
    summary = summary_of(clustered, devices=[i % 20 for i in range(2_000)])
    assert effective_sample_size(summary.devices) == pytest.approx(20, rel=0.05)


def test_moments_and_summaries_merge_exactly():
    values = RNG.normal(400, 1, 999)
    whole = summary_of(values)
    devices = [i % 7 for i in range(999)]
    merged = summary_of(values[:300], devices[:300]).merge(summary_of(values[300:], devices[300:]))
    assert np.array_equal(merged.psi_counts, whole.psi_counts) and np.array_equal(merged.ks_counts, whole.ks_counts)
    pooled = merged.pooled()
    assert pooled.mean == pytest.approx(values.mean()) and pooled.m2 / pooled.n == pytest.approx(values.var())
    for device, moments in whole.devices.items():
        assert merged.devices[device].mean == pytest.approx(moments.mean)


def test_adding_values_at_once_equals_adding_them_one_by_one():
    values = [None if i % 11 == 0 else float(v) for i, v in enumerate(RNG.normal(11.0, 3.0, 3000))]
    values[5] = float("nan")
    devices = [f"d{int(d)}" for d in RNG.integers(0, 40, len(values))]
    one_by_one = summary_of(values, devices=[d[1:] for d in devices])
    at_once = WindowSummary.empty(REFERENCE)
    at_once.add_many(REFERENCE, devices[:1700], values[:1700])
    at_once.add_many(REFERENCE, devices[1700:], values[1700:])
    assert (at_once.events, at_once.missing) == (one_by_one.events, one_by_one.missing)
    np.testing.assert_array_equal(at_once.psi_counts, one_by_one.psi_counts)
    np.testing.assert_array_equal(at_once.ks_counts, one_by_one.ks_counts)
    assert list(at_once.devices) == list(one_by_one.devices)
    for device, moments in one_by_one.devices.items():
        other = at_once.devices[device]
        assert other.n == moments.n
        assert other.mean == pytest.approx(moments.mean, rel=1e-12) and other.m2 == pytest.approx(moments.m2, rel=1e-10)


def test_a_summary_pickled_with_a_devices_dict_still_loads():
    old_form = {"psi_counts": np.zeros(10, np.int64), "ks_counts": np.zeros(100, np.int64), "events": 3,
                "missing": 0, "devices": {"d2": Moments(2, 1.0, 0.5), "d1": Moments(1, 3.0, 0.0)}}
    summary = WindowSummary.__new__(WindowSummary)
    summary.__setstate__(old_form)
    assert [(d, m.n, m.mean, m.m2) for d, m in summary.devices.items()] == [("d1", 1, 3.0, 0.0), ("d2", 2, 1.0, 0.5)]
    assert summary.pooled().n == 3


def test_summary_survives_pickle_and_deepcopy():
    summary = summary_of([1.0, None, 12.0])
    for clone in (pickle.loads(pickle.dumps(summary)), copy.deepcopy(summary)):
        assert clone.events == 3 and clone.missing == 1
        assert clone.pooled().mean == pytest.approx(6.5)
    assert pickle.loads(pickle.dumps(Moments(2, 1.0, 3.0))).m2 == 3.0


def test_window_record_flags_a_three_std_shift_and_not_the_same_distribution():
    thresholds = DriftThresholds()
    same = drift_statistics(summary_of(RNG.normal(10, 2, 1_200)), REFERENCE, thresholds)
    shifted = drift_statistics(summary_of(RNG.normal(16, 2, 1_200)), REFERENCE, thresholds)
    assert not same["drift"] and same["psi"] < 0.05 and same["ks_pvalue"] > 1e-3
    assert shifted["drift"] and shifted["psi"] > 5 and shifted["ks_pvalue"] < 1e-12
    assert shifted["mean"] == pytest.approx(16, abs=0.2) and shifted["reference_mean"] == pytest.approx(10, abs=0.05)


def test_few_values_or_only_missing_ones_never_count_as_drift():
    few = drift_statistics(summary_of([100.0] * 10), REFERENCE, DriftThresholds())
    assert few["psi"] > 5 and not few["drift"]
    missing = drift_statistics(summary_of([None] * 60), REFERENCE, DriftThresholds())
    assert missing["missing_rate"] == 1.0 and missing["count"] == 60 and not missing["drift"]
