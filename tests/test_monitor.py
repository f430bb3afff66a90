"""The live view: registry figures, the status line, and /metrics over a real HTTP GET."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from beam_jobs.monitor import Monitor, prometheus_text, status_line
from transforms.live_stats import LiveStats
from transforms.offset_commits import SourcePosition


def busy_stats() -> LiveStats:
    """100 records read from p0 (offsets 10..109) and 20 from p1; 90 of p0's answered for, 3 of them anomalous."""
    stats = LiveStats()
    stats.batch_read("in:0", 10, 100, highwater=110)
    stats.batch_read("in:1", 0, 20, highwater=20)
    time.sleep(0.05)
    stats.written("scores", [SourcePosition("in", 0, offset, offset) for offset in range(10, 95)])
    stats.written("dead_letters", [SourcePosition("in", 0, offset, offset) for offset in range(95, 100)])
    stats.written("drift", [None])
    for i in range(85):
        stats.scored(i < 3)
    stats.add("devices_started", 7)
    stats.add("devices_expired", 2)
    return stats


def test_snapshot_counts_lag_and_latency_from_read_to_written():
    snapshot = busy_stats().snapshot()
    assert (snapshot["events_read"], snapshot["scores"], snapshot["dead_letters"], snapshot["anomalies"]) == (120, 85,
                                                                                                             5, 3)
    assert snapshot["lag"] == {"in:0": 10, "in:1": 20}
    assert len(snapshot["latencies_ms"]) == 90 and min(snapshot["latencies_ms"]) >= 50


def test_status_line_rates_since_the_previous_snapshot():
    stats = busy_stats()
    previous = {**stats.snapshot(), "at": stats.snapshot()["at"] - 2.0, "scores": 5, "dead_letters": 5, "anomalies": 0}
    stats.add("late_events", 3)
    line = status_line(previous, stats.snapshot())
    assert line.endswith("late 3")
    assert "throughput    40.0/s" in line and "lag 0:10 1:20" in line and "anomaly rate 3.75%" in line
    assert re.search(r"p50 \d+ p95 \d+ p99 \d+", line)


def test_metrics_endpoint_serves_prometheus_text_over_http():
    stats = busy_stats()
    monitor = Monitor(interval_s=0, port=0, stats=stats)
    assert monitor.port is None  # port 0 means off
    probe = Monitor(interval_s=0, port=_free_port(), stats=stats).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{probe.port}/metrics", timeout=5) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{probe.port}/other", timeout=5)
    finally:
        probe.stop()
    assert body == prometheus_text(stats.snapshot())
    assert "sensor_scoring_scores_total 85" in body and "sensor_scoring_drift_total 1" in body
    assert 'sensor_scoring_consumer_lag{topic="in",partition="0"} 10' in body
    assert re.search(r'sensor_scoring_end_to_end_latency_ms\{quantile="0.99"\} \d', body)
    assert "sensor_scoring_end_to_end_latency_ms_count 90" in body
    assert "sensor_scoring_devices_expired_total 2" in body and "sensor_scoring_live_devices 5" in body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
