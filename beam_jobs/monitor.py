"""The job's live view: a status line in the log every few seconds and Prometheus text on --metrics_port.

Design: a thread in the job's main process, started before ``pipeline.run()``,
reads ``transforms.live_stats.LIVE``, which the source, the scoring step and
the sink update as they work (the in-process runner keeps Beam metrics to
itself until the job ends). Figures per status line:

* throughput: scores and dead letters written per second since the last line;
* end-to-end latency p50/p95/p99: from the source reading a record's batch to
  the broker acknowledging its output, over the last 20 000 outputs;
* lag per partition: the partition's high watermark minus the end of its
  written prefix (records read or waiting, not yet answered for);
* anomaly rate: anomalies per score since the last line;
* late events so far (transforms/event_time.py).

``GET /metrics`` (stdlib ``http.server`` in a daemon thread) serves the same
as Prometheus text: counters, a latency summary with quantiles, lag gauges.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np

from transforms.live_stats import LIVE, LiveStats
from transforms.offset_commits import split_partition_key

_LOG = logging.getLogger("sensor_scoring.status")
QUANTILES = (0.5, 0.95, 0.99)


def latency_quantiles(latencies_ms: list[int]) -> dict[float, float]:
    if not latencies_ms:
        return {q: float("nan") for q in QUANTILES}
    values = np.quantile(np.asarray(latencies_ms, dtype=np.float64), QUANTILES)
    return dict(zip(QUANTILES, values.tolist()))


def status_line(previous: dict, current: dict) -> str:
    """One line: throughput, latency quantiles, lag per partition, anomaly rate."""
    elapsed = max(current["at"] - previous["at"], 1e-9)
    outputs = current["scores"] + current["dead_letters"] - previous["scores"] - previous["dead_letters"]
    scores = current["scores"] - previous["scores"]
    anomalies = current["anomalies"] - previous["anomalies"]
    p50, p95, p99 = latency_quantiles(current["latencies_ms"]).values()
    lag = " ".join(f"{key.rsplit(':', 1)[-1]}:{n}" for key, n in current["lag"].items()) or "-"
    rate = f"{100.0 * anomalies / scores:.2f}%" if scores else "-"
    return (f"throughput {outputs / elapsed:7.1f}/s | e2e latency ms p50 {p50:.0f} p95 {p95:.0f} p99 {p99:.0f} | "
            f"lag {lag} | anomaly rate {rate} | scores {current['scores']} dead letters {current['dead_letters']} "
            f"late {current['late_events']}")


def prometheus_text(snapshot: dict) -> str:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    lines = []
    for name, help_text in (("events_read", "input records read"), ("scores", "scores written"),
                            ("dead_letters", "dead letters written"), ("anomalies", "anomalous scores"),
                            ("drift", "drift statistics written"), ("retrain", "retrain triggers written"),
                            ("devices_started", "device states started"),
                            ("devices_expired", "idle device states reclaimed"),
                            ("late_events", "events behind their partition's event-time watermark by more than "
                                            "the allowed lateness: scored, left out of drift")):
        lines += [f"# HELP sensor_scoring_{name}_total {help_text}", f"# TYPE sensor_scoring_{name}_total counter",
                  f"sensor_scoring_{name}_total {snapshot.get(name, 0)}"]
    latencies = snapshot["latencies_ms"]
    lines += ["# HELP sensor_scoring_end_to_end_latency_ms source read to broker ack, recent outputs",
              "# TYPE sensor_scoring_end_to_end_latency_ms summary"]
    lines += [f'sensor_scoring_end_to_end_latency_ms{{quantile="{q}"}} {v}' for q, v in latency_quantiles(latencies).items()]
    lines += [f"sensor_scoring_end_to_end_latency_ms_sum {float(sum(latencies))}",
              f"sensor_scoring_end_to_end_latency_ms_count {len(latencies)}",
              "# HELP sensor_scoring_live_devices devices holding state now (started - reclaimed)",
              "# TYPE sensor_scoring_live_devices gauge",
              f"sensor_scoring_live_devices {snapshot.get('devices_started', 0) - snapshot.get('devices_expired', 0)}",
              "# HELP sensor_scoring_consumer_lag records of the partition not yet answered for",
              "# TYPE sensor_scoring_consumer_lag gauge"]
    for key, lag in snapshot["lag"].items():
        topic, partition = split_partition_key(key)
        lines.append(f'sensor_scoring_consumer_lag{{topic="{topic}",partition="{partition}"}} {lag}')
    return "\n".join(lines) + "\n"


def _handler_for(stats: LiveStats) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's hook name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            body = prometheus_text(stats.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # scrapes every few seconds would flood the job log
            return

    return MetricsHandler


def _serve(port: int, stats: LiveStats) -> Optional[ThreadingHTTPServer]:
    """The /metrics server, or None with a warning when the port is taken: the job runs on without it."""
    try:
        return ThreadingHTTPServer(("", port), _handler_for(stats))
    except OSError as e:
        _LOG.warning("cannot serve metrics on port %d: %s", port, e)
        return None


class Monitor:
    """Status lines every `interval_s` (0: none) and /metrics on `port` (0: none) until stop()."""

    def __init__(self, interval_s: float, port: int, stats: LiveStats = LIVE):
        self._interval_s = interval_s
        self._stats = stats
        self._stop = threading.Event()
        self._server = _serve(port, stats) if port else None
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> Optional[int]:
        return self._server.server_address[1] if self._server else None

    def start(self) -> Monitor:
        if self._server:
            self._threads.append(threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True))
            _LOG.info("serving Prometheus metrics on :%d/metrics", self.port)
        if self._interval_s > 0:
            self._threads.append(threading.Thread(target=self._log_status, name="status-line", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def _log_status(self) -> None:
        previous = self._stats.snapshot()
        while not self._stop.wait(self._interval_s):
            current = self._stats.snapshot()
            _LOG.info("%s", status_line(previous, current))
            previous = current
