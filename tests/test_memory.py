"""The documented bound on per-device state, and its reclaim in the running job.

Calibration keeps the device's warm-up readings, so the state grows with
``--calibration_events`` until calibration ends, then stays constant.
benchmarks/memory.py measures the whole job's RSS under a flood.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from beam_jobs.embedded_broker import free_port
from benchmarks.memory import flood, live_devices, state_sizes, tick
from transforms.kafka_client import ensure_topics

ROOT = Path(__file__).resolve().parents[1]

CALIBRATED_MAX_BYTES = 2048
PER_CALIBRATION_EVENT_MAX_BYTES = 128


@pytest.mark.parametrize("calibration_events", [10, 60])
def test_pickled_device_state_stays_within_the_documented_bound(calibration_events):
    sizes = state_sizes(calibration_events, calibration_events + 100)
    assert max(sizes) <= CALIBRATED_MAX_BYTES + PER_CALIBRATION_EVENT_MAX_BYTES * calibration_events
    calibrated = sizes[calibration_events + 1:]
    assert max(calibrated) <= CALIBRATED_MAX_BYTES
    assert max(calibrated) == min(calibrated)  # no growth with the number of events once calibrated


def _live_devices_become(port: int, expected: int, timeout_s: float) -> None:
    deadline, seen = time.monotonic() + timeout_s, None
    while seen != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"devices holding state: {seen}, expected {expected} within {timeout_s:.0f} s")
        time.sleep(1.0)
        try:
            seen = live_devices(port)
        except (OSError, urllib.error.URLError):  # the job's /metrics is not up yet
            pass


@pytest.mark.slow
def test_a_flood_of_one_off_devices_is_reclaimed_by_the_streaming_job(kafka_config, topic_names, tmp_path):
    """The in-process runner fires expiry timers in its next round, long before the evidence arrives: the
    devices must still be reclaimed once a record of each partition carries the watermark past their
    expiry. The wait before the tick outlasts the nine early firings after which timers used to give up."""
    topic, partitions, devices, ttl_ms = topic_names("in"), 2, 300, 5000
    ensure_topics(kafka_config, [topic], partitions=partitions)
    port = free_port()
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bootstrap_servers", kafka_config.bootstrap_servers,
             "--input_topic", topic, "--score_topic", topic_names("scores"), "--drift_topic", topic_names("drift"),
             "--dead_letter_topic", topic_names("dead"), "--state_ttl_s", str(ttl_ms / 1000),
             "--metrics_port", str(port)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        start_ms = int(time.time() * 1000) - 3_600_000
        flood(kafka_config, devices, start_ms, topic=topic)
        _live_devices_become(port, devices, 120)
        time.sleep(10)
        tick(kafka_config, start_ms + 3 * ttl_ms, topic=topic, partitions=partitions)
        _live_devices_become(port, partitions, 60)  # only the tick devices hold state
        assert job.poll() is None, (tmp_path / "job.log").read_text()
    finally:
        job.kill()
        job.wait()
