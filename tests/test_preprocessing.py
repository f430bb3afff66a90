"""Tests of models.preprocessing against numpy oracles.

The streaming calibration (Welford, one event at a time, NaN = missing) must
give the baseline numpy computes over the first N events in one go.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from apache_beam.coders import PickleCoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models.preprocessing import MIN_STD_SHARE, FeaturePreprocessor, readings_vector

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
readings = st.floats(-1e3, 1e3, allow_subnormal=False)


def _run(pre: FeaturePreprocessor, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs, masks = zip(*(pre.transform(row) for row in rows))
    return np.stack(xs), np.stack(masks)


def _baseline(calibration: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: numpy's per-feature mean and sample std over the observed calibration values."""
    count = (~np.isnan(calibration)).sum(axis=0)
    mean, std = ref_mean.copy(), ref_std.copy()
    for j in range(calibration.shape[1]):
        observed = calibration[~np.isnan(calibration[:, j]), j]
        if count[j] > 0:
            mean[j] = observed.mean()
        if count[j] > 1:
            std[j] = observed.std(ddof=1)
    return mean, np.maximum(std, MIN_STD_SHARE * ref_std)


@st.composite
def devices(draw):
    """(reference mean, reference std, N, calibration rows with NaNs, fully observed rows after)."""
    n_features = draw(st.integers(1, 4))
    n = draw(st.integers(1, 30))
    ref_mean = draw(hnp.arrays(np.float64, n_features, elements=readings))
    ref_std = draw(hnp.arrays(np.float64, n_features, elements=st.floats(0.1, 100.0)))
    calibration = draw(hnp.arrays(np.float64, (n, n_features), elements=readings))
    missing = draw(hnp.arrays(np.bool_, (n, n_features)))
    calibration[missing] = np.nan
    after = draw(hnp.arrays(np.float64, (draw(st.integers(1, 10)), n_features), elements=readings))
    return ref_mean, ref_std, n, calibration, after


@PROPERTY
@given(device=devices())
def test_baseline_after_calibration_is_numpys_mean_and_std_of_the_first_n(device):
    ref_mean, ref_std, n, calibration, after = device
    pre = FeaturePreprocessor(ref_mean, ref_std, n)
    _run(pre, calibration)
    x, mask = _run(pre, after)
    mean, std = _baseline(calibration, ref_mean, ref_std)
    np.testing.assert_allclose(x, ((after - mean) / std).astype(np.float32), rtol=1e-5, atol=1e-4)
    assert np.all(mask == 1.0) and x.dtype == mask.dtype == np.float32


@PROPERTY
@given(device=devices())
def test_until_the_last_calibration_event_the_fleet_reference_normalises(device):
    ref_mean, ref_std, n, calibration, _ = device
    x, mask = _run(FeaturePreprocessor(ref_mean, ref_std, n), calibration)
    observed = ~np.isnan(calibration[: n - 1])
    expected = ((calibration[: n - 1] - ref_mean) / ref_std).astype(np.float32)
    np.testing.assert_allclose(x[: n - 1][observed], expected[observed], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(mask, (~np.isnan(calibration)).astype(np.float32))


def test_calibrating_is_true_for_exactly_the_first_n_events():
    pre = FeaturePreprocessor(np.zeros(2), np.ones(2), 3)
    flags = []
    for _ in range(6):
        flags.append(pre.calibrating)
        pre.transform(np.array([1.0, 2.0]))
    assert flags == [True, True, True, False, False, False]
    assert pre.events_seen == 6


@PROPERTY
@given(device=devices(), data=st.data())
def test_missing_readings_take_the_last_observed_value_else_the_baseline_mean(device, data):
    ref_mean, ref_std, n, calibration, after = device
    rows = np.concatenate([calibration, after])
    later_missing = data.draw(hnp.arrays(np.bool_, after.shape))
    rows[len(calibration):][later_missing] = np.nan
    x, mask = _run(FeaturePreprocessor(ref_mean, ref_std, n), rows)
    mean, std = _baseline(calibration, ref_mean, ref_std)
    np.testing.assert_array_equal(mask, (~np.isnan(rows)).astype(np.float32))
    for j in range(rows.shape[1]):
        for t in range(n, len(rows)):
            seen = rows[:t + 1, j][~np.isnan(rows[:t + 1, j])]
            filled = seen[-1] if len(seen) else mean[j]
            assert x[t, j] == pytest.approx((filled - mean[j]) / std[j], rel=1e-5, abs=1e-4), (t, j)


def test_imputation_before_any_observation_uses_the_reference_mean():
    ref_mean, ref_std = np.array([10.0, -5.0]), np.array([2.0, 4.0])
    pre = FeaturePreprocessor(ref_mean, ref_std, 5)
    x, mask = pre.transform(np.array([np.nan, 3.0]))
    np.testing.assert_array_equal(x, np.array([0.0, 2.0], dtype=np.float32))
    np.testing.assert_array_equal(mask, np.array([0.0, 1.0], dtype=np.float32))
    x, mask = pre.transform(np.array([14.0, np.nan]))  # the last value of feature 1 was 3.0
    np.testing.assert_array_equal(x, np.array([2.0, 2.0], dtype=np.float32))
    np.testing.assert_array_equal(mask, np.array([1.0, 0.0], dtype=np.float32))


def test_a_flat_feature_gets_the_minimum_std_share_of_the_fleet_std():
    ref_mean, ref_std = np.array([0.0, 0.0]), np.array([4.0, 4.0])
    pre = FeaturePreprocessor(ref_mean, ref_std, 10)
    _run(pre, np.array([[5.0, 5.0 + (i % 2) * 8.0] for i in range(10)]))
    x, _ = pre.transform(np.array([6.0, 9.0]))
    flat_std = MIN_STD_SHARE * 4.0
    varied = np.array([5.0 + (i % 2) * 8.0 for i in range(10)])
    assert x[0] == pytest.approx(1.0 / flat_std, rel=1e-6)
    assert x[1] == pytest.approx((9.0 - varied.mean()) / varied.std(ddof=1), rel=1e-6)


def test_a_feature_seen_once_keeps_the_fleet_std_and_one_never_seen_the_fleet_mean():
    ref_mean, ref_std = np.array([1.0, 2.0]), np.array([3.0, 0.5])
    pre = FeaturePreprocessor(ref_mean, ref_std, 3)
    _run(pre, np.array([[7.0, np.nan], [np.nan, np.nan], [np.nan, np.nan]]))
    x, _ = pre.transform(np.array([10.0, 3.0]))
    np.testing.assert_allclose(x, [(10.0 - 7.0) / 3.0, (3.0 - 2.0) / 0.5], rtol=1e-6)


def _random_rows(seed: int, n: int = 40, n_features: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(50.0, 10.0, (n, n_features))
    rows[rng.random(rows.shape) < 0.2] = np.nan
    return rows


@pytest.mark.parametrize("split", [0, 7, 19, 20, 33], ids=lambda s: f"after-{s}")
@pytest.mark.parametrize(
    "clone",
    [copy.deepcopy, lambda p: pickle.loads(pickle.dumps(p)), lambda p: PickleCoder().decode(PickleCoder().encode(p))],
    ids=["deepcopy", "pickle", "beam-pickle-coder"],
)
def test_a_copied_state_continues_exactly_like_the_original(clone, split):
    rows = _random_rows(seed=split)
    pre = FeaturePreprocessor(np.full(3, 45.0), np.full(3, 8.0), 20)
    if split:
        _run(pre, rows[:split])
    copied = clone(pre)
    x, mask = _run(pre, rows[split:])
    x_copy, mask_copy = _run(copied, rows[split:])
    np.testing.assert_array_equal(x_copy, x)
    np.testing.assert_array_equal(mask_copy, mask)
    assert copied.events_seen == pre.events_seen == len(rows)


def test_a_copy_is_independent_of_the_original():
    rows = _random_rows(seed=1)
    pre = FeaturePreprocessor(np.full(3, 45.0), np.full(3, 8.0), 20)
    _run(pre, rows[:10])
    copied = copy.deepcopy(pre)
    _run(pre, rows[10:])  # the original moves on; the copy must not
    fresh = FeaturePreprocessor(np.full(3, 45.0), np.full(3, 8.0), 20)
    _run(fresh, rows[:10])
    np.testing.assert_array_equal(_run(copied, rows[10:])[0], _run(fresh, rows[10:])[0])


def test_readings_vector_orders_features_and_marks_missing_as_nan():
    vector = readings_vector({"b": 2, "a": None, "extra": 9.0}, ["a", "b", "c"])
    assert vector.dtype == np.float64
    np.testing.assert_array_equal(vector, [np.nan, 2.0, np.nan])
