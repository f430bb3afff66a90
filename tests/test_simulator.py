"""Tests of the line simulator: reproducible, schema-valid, and honestly labelled.

The scoring job is judged against these labels, so the tests check that faults
really distort the readings and that unlabelled behaviour (drift, noise) does not,
and that the bundled model, run as the job runs it, agrees with them.
"""

from __future__ import annotations

import numpy as np
import pytest

from beam_jobs.simulator import DEFAULT_START_MS, DRIFT_FEATURE, FEATURES, LineSimulator, SimulatorConfig
from benchmarks.simulator_alarms import count_alarms
from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from models.bundle import job_default_calibration_events
from schemas.serde import EVENT, AvroDecoder, AvroEncoder

HOURS = 2


def _matrix(events: list[tuple[dict, bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readings as floats (NaN where missing), fault labels and device ids."""
    values = np.array([[np.nan if e["readings"][f] is None else e["readings"][f] for f in FEATURES] for e, _ in events])
    labels = np.array([is_fault for _, is_fault in events])
    devices = np.array([e["device_id"] for e, _ in events])
    return values, labels, devices


@pytest.fixture(scope="module")
def line():
    """Two hours of a 20-device line, shared because it takes a second to make."""
    config = SimulatorConfig(devices=20, seed=7, fault_rate_per_hour=3.0)
    return config, _matrix(LineSimulator(config).take(config.devices * 3600 * HOURS))


def test_same_seed_gives_same_events_and_other_seeds_differ():
    first = LineSimulator(SimulatorConfig(devices=5, seed=3)).take(2000)
    again = LineSimulator(SimulatorConfig(devices=5, seed=3)).take(2000)
    other = LineSimulator(SimulatorConfig(devices=5, seed=4)).take(2000)
    assert first == again
    assert [e["readings"] for e, _ in first] != [e["readings"] for e, _ in other]


def test_each_events_call_starts_over():
    simulator = LineSimulator(SimulatorConfig(devices=4, seed=1))
    assert simulator.take(500) == simulator.take(500)


def test_events_round_trip_through_the_avro_schema():
    encode, decode = AvroEncoder(EVENT), AvroDecoder(EVENT)
    events = LineSimulator(SimulatorConfig(devices=10, seed=2, missing_rate=0.1)).take(3000)
    assert any(None in e["readings"].values() for e, _ in events)
    for event, _ in events:
        assert set(event["readings"]) == set(FEATURES)
        assert decode(encode(event)) == event


def test_event_time_advances_at_the_rate_round_robin_over_devices():
    config = SimulatorConfig(devices=7, rate_hz=3.0, start_ms=1_600_000_000_000)
    simulator = LineSimulator(config)
    events = [e for e, _ in simulator.take(7 * 500)]
    times = [e["event_time"] for e in events]
    assert times == sorted(times)
    assert [e["device_id"] for e in events[:14]] == simulator.device_ids * 2
    for step in range(500):
        for event in events[step * 7 : (step + 1) * 7]:
            assert event["event_time"] == config.start_ms + round(step * 1000 / 3.0)
            assert event["event_id"] == f"{event['device_id']}-{step}"
    assert len({e["event_id"] for e in events}) == len(events)


def test_start_time_defaults_to_a_fixed_instant_not_now():
    event, _ = LineSimulator(SimulatorConfig()).take(1)[0]
    assert event["event_time"] == DEFAULT_START_MS


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        SimulatorConfig(devices=0)
    with pytest.raises(ValueError):
        SimulatorConfig(rate_hz=0)
    with pytest.raises(ValueError):
        SimulatorConfig(missing_rate=1.0)


def test_faults_are_labelled_at_about_the_configured_rate(line):
    _, (_, labels, _) = line
    # 3 faults an hour lasting about 2.4 minutes on average (a fifth are one-reading spikes).
    assert 0.05 < labels.mean() < 0.2
    no_faults = LineSimulator(SimulatorConfig(devices=5, fault_rate_per_hour=0.0)).take(5 * 3600)
    assert not any(is_fault for _, is_fault in no_faults)


def test_faulty_readings_stand_out_from_normal_ones(line):
    _, (values, labels, devices) = line
    faulty, normal = [], []
    for device in np.unique(devices):
        rows, is_fault = values[devices == device], labels[devices == device]
        healthy = rows[~is_fault]
        z = np.abs((rows - np.nanmean(healthy, axis=0)) / np.nanstd(healthy, axis=0))
        worst = np.nanmax(z, axis=1)  # a fault distorts one or two features, not all six
        faulty.extend(worst[is_fault])
        normal.extend(worst[~is_fault])
    assert np.mean(faulty) > 2.5 * np.mean(normal)


def _frozen_rows(column: np.ndarray, min_run: int = 10) -> np.ndarray:
    """Rows inside runs of at least `min_run` identical readings, missing ones skipped.

    Readings are rounded to 0.001, so a low-noise sensor repeats a value two or
    three times by chance; a stuck one repeats it for the whole fault.
    """
    present = np.flatnonzero(~np.isnan(column))
    same = np.diff(column[present]) == 0
    frozen = np.zeros(len(column), bool)
    run_start = 0
    for i in range(len(same) + 1):
        if i == len(same) or not same[i]:
            if i - run_start + 1 >= min_run:
                frozen[present[run_start : i + 1]] = True
            run_start = i + 1
    return frozen


def test_stuck_sensors_freeze_only_during_faults(line):
    _, (values, labels, devices) = line
    frozen_total = 0
    for device in np.unique(devices):
        rows, is_fault = values[devices == device], labels[devices == device]
        for column in rows.T:
            frozen = _frozen_rows(column)
            assert is_fault[frozen].all()
            frozen_total += frozen.sum()
    assert frozen_total > 0


def test_missing_readings_occur_at_the_configured_rate(line):
    config, (values, _, _) = line
    assert np.isnan(values).mean() == pytest.approx(config.missing_rate, rel=0.1)
    many = LineSimulator(SimulatorConfig(devices=10, missing_rate=0.2)).take(20_000)
    assert np.isnan(_matrix(many)[0]).mean() == pytest.approx(0.2, rel=0.05)


def test_devices_have_distinct_baselines(line):
    _, (values, labels, devices) = line
    means = np.array([np.nanmean(values[(devices == d) & ~labels], axis=0) for d in np.unique(devices)])
    within = np.mean([np.nanstd(values[(devices == d) & ~labels], axis=0) for d in np.unique(devices)], axis=0)
    # Machines differ by more than one machine's readings vary over its load cycle.
    ratio = np.std(means, axis=0) / within
    assert (ratio > 0.5).all(), dict(zip(FEATURES, ratio, strict=True))
    assert len({tuple(np.round(m, 1)) for m in means}) == len(means)


def test_features_are_correlated_through_load(line):
    _, (values, labels, devices) = line
    rows = values[(devices == devices[0]) & ~labels]
    rows = rows[~np.isnan(rows).any(axis=1)]
    corr = np.corrcoef(rows.T)
    index = {f: i for i, f in enumerate(FEATURES)}
    assert corr[index["current"], index["temperature"]] > 0.3
    assert corr[index["current"], index["vibration"]] > 0.3
    assert corr[index["flow"], index["pressure"]] > 0.8
    assert corr[index["current"], index["voltage"]] < -0.2


def test_fleet_drift_shifts_one_feature_and_is_never_labelled():
    base = SimulatorConfig(devices=4, seed=5, fault_rate_per_hour=0.0, missing_rate=0.0)
    drifted = SimulatorConfig(devices=4, seed=5, fault_rate_per_hour=0.0, missing_rate=0.0, drift_per_hour=6.0)
    moving = LineSimulator(drifted).take(4 * 7200)
    assert not any(is_fault for _, is_fault in moving)
    shift = _matrix(moving)[0] - _matrix(LineSimulator(base).take(4 * 7200))[0]
    hours = (np.array([e["event_time"] for e, _ in moving]) - DEFAULT_START_MS) / 3_600_000
    expected = np.zeros_like(shift)
    expected[:, FEATURES.index(DRIFT_FEATURE)] = 6.0 * hours
    np.testing.assert_allclose(shift, expected, atol=2e-3)


def test_bundled_model_stays_quiet_on_a_fault_free_line_after_default_calibration():
    """The demo's anomaly count means something only if a healthy line rarely alarms once calibrated."""
    config = SimulatorConfig(devices=6, seed=0, fault_rate_per_hour=0.0)
    counts = count_alarms(load_artifact(BUNDLED_MODEL_DIR), config, 360, job_default_calibration_events())
    assert counts.scored == 6 * (360 - job_default_calibration_events())
    assert counts.fault_free_alarm_rate <= 0.02


def test_alarms_on_the_demo_stream_mostly_coincide_with_injected_faults():
    """./run_local.sh --events 3000 (10 machines, seed 0): alarms fall on faults or in their EWMA tail."""
    config = SimulatorConfig(devices=10, seed=0)
    counts = count_alarms(load_artifact(BUNDLED_MODEL_DIR), config, 300, job_default_calibration_events())
    assert counts.faulty > 0 and counts.alarms > 0
    assert counts.precision > 0.5 and counts.precision_with_tails > 0.8
