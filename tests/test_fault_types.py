"""Fault-type recall on a small simulated fleet, with a real model trained on that line's normal operation.

Pins what the issue asks of the detector: a fault held for 100 events, of 6
calibration sigmas on the reading it hits, alarms on every machine, whatever
its type (a stuck reading and spike bursts included); a missing-data burst
alarms no more than the same windows without it.
"""

from __future__ import annotations

import fastavro
import numpy as np
import pytest

from beam_jobs.simulator import LineSimulator, SimulatorConfig
from benchmarks.fault_types import FAULT_EVENTS, FAULT_TYPES, evaluate, inject
from models.artifact import ModelArtifact
from models.train import train
from schemas.serde import EVENT, current_schema


CALIBRATION, DEVICES = 120, 10


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> ModelArtifact:
    root = tmp_path_factory.mktemp("fault-types")
    normal = LineSimulator(SimulatorConfig(devices=DEVICES, seed=21, fault_rate_per_hour=0.0))
    with open(root / "normal.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(current_schema(EVENT)),
                        [event for event, _ in normal.take(DEVICES * 600)])
    return train([root / "normal.avro"], root / "model", epochs=40, seed=0, hidden_size=8,
                 calibration_events=CALIBRATION)


@pytest.fixture(scope="module")
def report(artifact):
    return {r.kind: r for r in evaluate(artifact, CALIBRATION, devices=DEVICES, size=6.0, seed=3).types}


@pytest.mark.parametrize("kind", [k for k in FAULT_TYPES if k != "missing"])
def test_a_six_sigma_fault_held_for_100_events_alarms_on_every_device(report, kind):
    assert report[kind].recall == 1.0
    assert np.median(report[kind].delays) <= 50


def test_a_missing_burst_alarms_no_more_than_the_same_windows_without_it(report):
    """Imputed readings add no evidence: the windows alarm as they do without the gap (one machine of this fleet,
    of a kind the small training fleet lacks, alarms on its own level changes with or without it)."""
    missing = report["missing"]
    assert missing.detected <= missing.clean_detected
    assert missing.alarm_share <= missing.clean_share + 0.005


def test_each_fault_changes_only_its_window_and_its_readings():
    rng = np.random.default_rng(0)
    series = rng.normal(size=(400, 6))
    sigma = series.std(axis=0)
    for kind in FAULT_TYPES:
        faulty = inject(series, kind, 200, 1, sigma, 6.0, rng)
        changed = np.argwhere(~np.isclose(faulty, series, equal_nan=False))
        assert changed.size, kind
        assert changed[:, 0].min() >= 200 and changed[:, 0].max() < 200 + FAULT_EVENTS, kind
        assert set(changed[:, 1]) <= ({1, 2, 3} if kind == "correlated" else {1}), kind
