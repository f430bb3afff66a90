"""SKAB's metrics: pooled point-wise counts, the NAB changepoint score, the cross-validation folds and choice."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.skab import SkabFile
from benchmarks.skab_cv import FREE_SEGMENT, Choice, choose, folds_of, free_segments
from benchmarks.skab_metrics import NAB_PROFILES, Counts, nab_raw, nab_scores
from models.detector import PostProcessing

TIMES = np.arange(0, 600_000, 1000)  # ten minutes at 1 Hz
CHANGES = [120_000, 400_000]


def alarms_at(*rows: int, length: int = 1) -> np.ndarray:
    alarms = np.zeros(len(TIMES), dtype=bool)
    for row in rows:
        alarms[row:row + length] = True
    return alarms


def test_counts_pool_by_adding():
    a, b = Counts(), Counts()
    a.add(np.array([True, False, True]), np.array([True, True, False]))
    b.add(np.array([False, True]), np.array([False, True]))
    total = a + b
    assert (total.tp, total.fp, total.fn, total.tn) == (2, 1, 1, 1)
    assert total.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_nab_is_100_for_a_detection_at_each_change_point_and_0_for_none():
    perfect = nab_scores([(TIMES, alarms_at(120, 400), CHANGES)])
    silent = nab_scores([(TIMES, alarms_at(), CHANGES)])
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    assert all(v == pytest.approx(0.0) for v in silent.values())


def test_nab_rewards_early_detection_counts_a_held_alarm_once_and_penalises_false_ones():
    standard = NAB_PROFILES[0]
    early, _, _ = nab_raw(TIMES, alarms_at(125, 400), CHANGES, standard)
    late, _, _ = nab_raw(TIMES, alarms_at(175, 400), CHANGES, standard)
    held, _, _ = nab_raw(TIMES, alarms_at(125, length=50) | alarms_at(400), CHANGES, standard)
    assert early > late and held == pytest.approx(early)
    with_false, _, _ = nab_raw(TIMES, alarms_at(10, 125, 400), CHANGES, standard)  # before any window: -A_FP
    assert with_false == pytest.approx(early - standard.fp)
    far_after, _, _ = nab_raw(TIMES, alarms_at(125, 400, 590), CHANGES, standard)  # 2 windows after: ~ -A_FP
    assert far_after == pytest.approx(early - standard.fp, abs=1e-4)
    just_after, _, _ = nab_raw(TIMES, alarms_at(125, 400, 462), CHANGES, standard)  # right after: a small cost
    assert early - standard.fp < just_after < early
    missed, null, _ = nab_raw(TIMES, alarms_at(125), CHANGES, NAB_PROFILES[2])  # LowFN: a miss costs 2
    at_window_start = 2 / (1 + np.exp(-5.0)) - 1  # the second window's detection in `early`
    assert missed == pytest.approx(early - at_window_start - 2.0)
    assert null == -4.0


def test_folds_deal_each_groups_labelled_files_round_robin():
    def f(name: str, labelled: bool = True) -> SkabFile:
        return SkabFile(name, TIMES[:2], ("x",), np.zeros((2, 1)), np.zeros(2) if labelled else None)
    files = [f("anomaly-free-anomaly-free", False)] + [f(f"valve1-{i}") for i in range(6)] + [f("other-0")]
    folds = folds_of(files, 4)
    assert folds == [[1, 5, 7], [2, 6], [3], [4]]


def test_the_anomaly_free_file_is_cut_into_half_overlapping_file_sized_devices_labelled_normal():
    rows = 2 * FREE_SEGMENT + 10
    free = SkabFile("anomaly-free-anomaly-free", np.arange(rows) * 1000, ("x",), np.arange(rows)[:, None] * 1.0, None)
    segments = free_segments([free])
    assert [s.readings[0, 0] for s in segments] == [0, FREE_SEGMENT // 2, 2 * (FREE_SEGMENT // 2)]
    assert all(len(s.readings) == len(s.times_ms) == len(s.labels) == FREE_SEGMENT for s in segments)
    assert all(not s.labels.any() for s in segments)


def test_the_choice_respects_the_false_alarm_bound_on_normal_operation_elsewhere():
    """The best F1 on the labelled files loses to a worse one when the anomaly-free segments alarm too often."""
    labels = np.r_[np.zeros(500), np.ones(100)]
    files = [SkabFile("valve1-0", TIMES, ("x",), np.zeros((600, 1)), labels)]
    perfect, late = Choice(30, PostProcessing(factor=1.0)), Choice(30, PostProcessing(factor=2.0))
    alarms = {perfect: {0: labels.astype(bool)}, late: {0: np.r_[np.zeros(550), np.ones(50)].astype(bool)}}
    assert choose(files, alarms, [0], 400, {perfect: 5.0, late: 5.0}) == perfect
    assert choose(files, alarms, [0], 400, {perfect: 30.0, late: 5.0}) == late
    assert choose(files, alarms, [0], 400, {perfect: 30.0, late: 20.0}) == late  # none within: the lowest FAR
