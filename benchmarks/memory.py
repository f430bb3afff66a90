"""Memory under a flood of distinct device ids, and after their state expires.

    python -m benchmarks.memory [--devices 100000] [--floods 2] [--state_ttl_s 10] [--job_args "..."]

1. Per-device state: the pickled size of a DeviceState (what Beam state
   holds per device) through calibration and after it.
2. The real streaming job in a child process against an embedded broker
   (``--job_args "--runner PrismRunner"``: on Prism, whose process counts too):
   its RSS when idle, after one event from each of ``--devices`` new devices
   has been scored, and after their state expired (an event per partition
   carrying the source watermark past the expiry time, then a wait), with
   the devices holding state at each point (the job's /metrics gauge); then
   again with other new devices, ``--floods`` times in all. The process heap
   keeps what a flood freed for reuse, so the second flood, not the first
   expiry, shows whether memory stays bounded.

Prints one line per figure and a JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from beam_jobs.embedded_broker import EmbeddedBroker, free_port
from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from schemas.serde import EVENT, AvroEncoder
from transforms.device_state import DeviceLogic
from transforms.kafka_client import KafkaConfig, end_offsets, ensure_topics, make_consumer, make_producer, partitions_of

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("temperature", "vibration", "current", "pressure", "flow", "voltage")
PARTITIONS = 4


def state_sizes(calibration_events: int, events: int) -> list[int]:
    """Pickled bytes of one device's state after each of `events` events."""
    logic = DeviceLogic.for_artifact(load_artifact(BUNDLED_MODEL_DIR), 600_000, calibration_events)
    state, sizes = None, []
    for i in range(events):
        readings = {f: 50.0 + (i % 5) for f in FEATURES}
        state = logic.on_event(state, 1_750_000_000_000 + i * 1000, readings, "in:0").state
        sizes.append(len(pickle.dumps(state)))
    return sizes


def rss_mib(pid: int) -> float:
    """Resident set size of a process and its descendants (a runner such as Prism), from /proc."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) / 1024
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        try:
            total += rss_mib(int(child))
        except (FileNotFoundError, ProcessLookupError):
            pass  # gone meanwhile
    return total


def produced(config: KafkaConfig, topic: str) -> int:
    consumer = make_consumer(config)
    try:
        return sum(end_offsets(consumer, partitions_of(consumer, topic)).values())
    finally:
        consumer.close()


def live_devices(metrics_port: int) -> int:
    """The job's sensor_scoring_live_devices gauge: devices holding state now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("sensor_scoring_live_devices "):
                return int(line.split()[1])
    raise RuntimeError("the job's /metrics has no sensor_scoring_live_devices")


def wait_until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s")
        time.sleep(2)


def flood(config: KafkaConfig, devices: int, start_ms: int, prefix: str = "flood", topic: str = "in") -> None:
    """One event from each of `devices` never-seen devices, keyed and timestamped as producers should."""
    encode, producer = AvroEncoder(EVENT), make_producer(config)
    for d in range(devices):
        event = {"event_id": f"{prefix}-{d}", "device_id": f"{prefix}-{d:06d}", "event_time": start_ms + d % 1000,
                 "readings": {f: 50.0 for f in FEATURES}}
        producer.send(topic, key=event["device_id"].encode(), value=encode(event), timestamp_ms=event["event_time"])
    producer.flush()
    producer.close()


def tick(config: KafkaConfig, event_time: int, topic: str = "in", partitions: int = PARTITIONS) -> None:
    """An event on every partition, so each partition's source watermark passes the flood's expiry."""
    encode, producer = AvroEncoder(EVENT), make_producer(config)
    for p in range(partitions):
        event = {"event_id": f"tick-{p}-{event_time}", "device_id": f"tick-{p}", "event_time": event_time,
                 "readings": {f: 50.0 for f in FEATURES}}
        producer.send(topic, value=encode(event), partition=p, timestamp_ms=event_time)
    producer.flush()
    producer.close()


def job_rss(devices: int, floods: int, state_ttl_s: float, log: Path, job_args: tuple[str, ...] = ()) -> dict:
    """RSS and live devices of the streaming job idle, then after each flood and after its expiry."""
    metrics_port = free_port()
    with EmbeddedBroker() as broker:
        config = KafkaConfig(broker.bootstrap_servers)
        ensure_topics(config, ["in", "scores"], partitions=PARTITIONS)
        with open(log, "w") as out:
            job = subprocess.Popen(
                [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bootstrap_servers", broker.bootstrap_servers,
                 "--input_topic", "in", "--score_topic", "scores", "--state_ttl_s", str(state_ttl_s),
                 "--metrics_port", str(metrics_port), *job_args],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)
        try:
            ttl_ms = int(state_ttl_s * 1000)
            start_ms = int(time.time() * 1000) - 3_600_000
            tick(config, start_ms - 1)
            scored = PARTITIONS
            wait_until(lambda: produced(config, "scores") >= scored, 120)
            figures = {"idle_mib": rss_mib(job.pid), "live_devices_idle": live_devices(metrics_port), "floods": []}
            for round_ in range(floods):
                flood_ms = start_ms + round_ * 4 * ttl_ms
                started = time.monotonic()
                flood(config, devices, flood_ms, prefix=f"flood{round_}")
                scored += devices
                wait_until(lambda: produced(config, "scores") >= scored, 1800)
                figures["floods"].append({"after_flood_mib": rss_mib(job.pid),
                                          "flood_s": round(time.monotonic() - started, 1),
                                          "live_devices_after_flood": live_devices(metrics_port)})
                tick(config, flood_ms + 3 * ttl_ms)
                scored += PARTITIONS
                # Scored once the checks the ticks released have run: the runner works them off first.
                wait_until(lambda: produced(config, "scores") >= scored, 1800)
                time.sleep(max(30.0, 3 * state_ttl_s))
                figures["floods"][-1] |= {"after_expiry_mib": rss_mib(job.pid),
                                          "live_devices_after_expiry": live_devices(metrics_port)}
            return figures
        finally:
            job.kill()
            job.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000, help="new device ids per flood (default 100000)")
    parser.add_argument("--floods", type=int, default=2,
                        help="floods, each followed by its expiry: a second shows whether freed memory is reused "
                             "(default 2)")
    parser.add_argument("--state_ttl_s", type=float, default=10.0)
    parser.add_argument("--log", default="out/memory-benchmark-job.log")
    parser.add_argument("--job_args", default="",
                        help='extra job flags, e.g. "--runner PrismRunner" (default: none, the in-process runner)')
    args = parser.parse_args(argv)
    default_cal = state_sizes(60, 120)
    summary = {"state_bytes_first_event": default_cal[0], "state_bytes_calibrating_max": max(default_cal[:60]),
               "state_bytes_calibrated": default_cal[-1]}
    print(f"pickled DeviceState: {summary['state_bytes_first_event']} B after one event, "
          f"at most {summary['state_bytes_calibrating_max']} B while calibrating (60 events), "
          f"{summary['state_bytes_calibrated']} B once calibrated", flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    rss = job_rss(args.devices, args.floods, args.state_ttl_s, Path(args.log), tuple(shlex.split(args.job_args)))
    print(f"job RSS idle: {rss['idle_mib']:.0f} MiB; devices holding state: {rss['live_devices_idle']}", flush=True)
    for i, f in enumerate(rss["floods"], 1):
        print(f"flood {i}: {f['after_flood_mib']:.0f} MiB after {args.devices} new devices ({f['flood_s']} s, "
              f"{f['live_devices_after_flood']} holding state), {f['after_expiry_mib']:.0f} MiB after their expiry "
              f"({f['live_devices_after_expiry']} holding state)", flush=True)
    print(json.dumps({**summary, **rss, "devices": args.devices}))


if __name__ == "__main__":
    main()
