"""Tests of models.preprocessing against numpy oracles: forward fill, baseline, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models.preprocessing import fit_baseline, forward_fill, readings_vector

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
readings = st.floats(-1e3, 1e3, allow_subnormal=False)


@st.composite
def rows_with_gaps(draw) -> np.ndarray:
    shape = (draw(st.integers(1, 30)), draw(st.integers(1, 4)))
    rows = draw(hnp.arrays(np.float64, shape, elements=readings))
    rows[draw(hnp.arrays(np.bool_, shape))] = np.nan
    return rows


@PROPERTY
@given(rows=rows_with_gaps())
def test_forward_fill_takes_the_last_observed_value_and_nan_before_any(rows):
    filled = forward_fill(rows)
    for j in range(rows.shape[1]):
        for t in range(len(rows)):
            seen = rows[: t + 1, j][~np.isnan(rows[: t + 1, j])]
            if len(seen):
                assert filled[t, j] == seen[-1]
            else:
                assert np.isnan(filled[t, j])


@PROPERTY
@given(rows=rows_with_gaps(), split=st.integers(0, 30))
def test_forward_fill_in_pieces_equals_in_one_go(rows, split):
    split = min(split, len(rows))
    first = forward_fill(rows[:split]) if split else np.empty((0, rows.shape[1]))
    last = first[-1] if split else None
    np.testing.assert_array_equal(np.concatenate([first, forward_fill(rows[split:], last)]), forward_fill(rows))


@PROPERTY
@given(rows=rows_with_gaps())
def test_baseline_is_numpys_median_and_population_std_with_a_floor(rows):
    baseline = fit_baseline(forward_fill(rows))
    filled = forward_fill(rows)
    for j in range(rows.shape[1]):
        column = filled[:, j][~np.isnan(filled[:, j])]
        median = np.median(column) if len(column) else 0.0
        std = np.std(column) if len(column) else 0.0
        assert baseline.median[j] == pytest.approx(median)
        assert baseline.scale[j] == pytest.approx(max(std, 1e-3 * abs(median) + 1e-6))


def test_a_flat_reading_gets_a_tiny_positive_scale_not_zero():
    baseline = fit_baseline(np.array([[32.0, 0.0]] * 10))
    assert baseline.scale[0] == pytest.approx(0.032 + 1e-6) and baseline.scale[1] == pytest.approx(1e-6)
    np.testing.assert_array_equal(baseline.normalise(np.array([32.0, 0.0])), [0.0, 0.0])


def test_a_never_observed_reading_normalises_to_the_baseline():
    baseline = fit_baseline(np.array([[1.0, np.nan], [3.0, np.nan]]))
    z = baseline.normalise(np.array([4.0, np.nan]))
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, [(4.0 - 2.0) / 1.0, 0.0])


def test_readings_vector_orders_features_and_marks_missing_as_nan():
    vector = readings_vector({"b": 2, "a": None, "extra": 9.0}, ["a", "b", "c"])
    assert vector.dtype == np.float64
    np.testing.assert_array_equal(vector, [np.nan, 2.0, np.nan])
