"""The documented bound on per-device state: what a flood of new devices can cost before expiry.

Calibration keeps the device's warm-up readings, so the state grows with
``--calibration_events`` until calibration ends, then stays constant.
benchmarks/memory.py measures the whole job's RSS under a flood.
"""

from __future__ import annotations

import pytest

from benchmarks.memory import state_sizes

CALIBRATED_MAX_BYTES = 2048
PER_CALIBRATION_EVENT_MAX_BYTES = 128


@pytest.mark.parametrize("calibration_events", [10, 60])
def test_pickled_device_state_stays_within_the_documented_bound(calibration_events):
    sizes = state_sizes(calibration_events, calibration_events + 100)
    assert max(sizes) <= CALIBRATED_MAX_BYTES + PER_CALIBRATION_EVENT_MAX_BYTES * calibration_events
    calibrated = sizes[calibration_events + 1:]
    assert max(calibrated) <= CALIBRATED_MAX_BYTES
    assert max(calibrated) == min(calibrated)  # no growth with the number of events once calibrated
