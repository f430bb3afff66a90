"""End-to-end latency of the streaming job at a steady input rate.

    python -m benchmarks.latency [--rate R] [--seconds S] [--devices D] [--broker tansu|kafka] [--job_args "..."]

Starts a broker (Tansu, or Apache Kafka) and the streaming job (DirectRunner),
waits until the job scores a warm-up event, then writes simulated events at R events/s
for S seconds and follows the score topic. Latency of an event is the time
from its write to the input topic until its score can be read from the score
topic; printed as p50/p95/p99, with the share of events scored. After the
feed stops it keeps reading for a while, so an event that waits for a batch to
fill when input pauses shows up as a long tail, not as a lost score.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from beam_jobs.local_broker import add_broker_argument, broker_cpu_seconds, job_flags, local_broker
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from schemas.serde import EVENT, AvroEncoder, ScoreHeadReader
from transforms.kafka_client import KafkaConfig, ensure_topics, make_consumer, make_producer, partitions_of

INPUT, SCORES = "latency-events", "latency-scores"
ROOT = Path(__file__).resolve().parents[1]
DRAIN_S = 15.0


def start_job(bootstrap: str, job_args: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bootstrap_servers", bootstrap,
               "--input_topic", INPUT, "--score_topic", SCORES, "--dead_letter_topic", "latency-dead",
               "--drift_topic", "latency-drift", "--retrain_topic", "latency-retrain",
               "--consumer_group", "latency", "--start_from", "latest", *shlex.split(job_args)]
    return subprocess.Popen(command, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


class ScoreWatcher:
    """Follows the score topic from its current end; records when each event_id's score became readable."""

    def __init__(self, config: KafkaConfig):
        # Fetches held no longer than 10 ms: the embedded broker holds an empty fetch its whole max wait.
        self._consumer = make_consumer(config, fetch_max_wait_ms=10)
        parts = partitions_of(self._consumer, SCORES)
        self._consumer.assign(parts)
        self._consumer.seek_to_end(*parts)
        self._event_id = ScoreHeadReader().event_id  # a fifth of a full decode: the watcher shares the job's cores
        self.seen_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=50).values():
                now = time.time()
                for r in records:
                    self.seen_at.setdefault(self._event_id(r.value), now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


def feed(config: KafkaConfig, rate: float, seconds: float, devices: int) -> dict[str, float]:
    """Writes events at a steady rate; returns each event_id's write time (after the producer handed it off).

    The events are simulated and encoded before the clock starts: the feeder
    shares the machine's cores with the job and should take no more of them
    than sending does.
    """
    producer = make_producer(config)
    encode = AvroEncoder(EVENT)
    events = LineSimulator(SimulatorConfig(devices=devices, seed=21, start_ms=int(time.time() * 1000))).events()
    encoded = [(event["event_id"], event["device_id"].encode(), encode(event), event["event_time"])
               for event, _ in itertools.islice(events, int(rate * seconds))]
    written: dict[str, float] = {}
    started = time.time()
    for i, (event_id, key, value, event_time) in enumerate(encoded):
        delay = started + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        producer.send(INPUT, key=key, value=value, timestamp_ms=event_time)
        written[event_id] = time.time()
        if i % 50 == 0:
            producer.flush()  # keep the client's own batching out of the figure
    producer.flush()
    producer.close()
    return written


def wait_until_scoring(config: KafkaConfig, watcher: ScoreWatcher, timeout_s: float = 120.0) -> None:
    """Sends warm-up events to every input partition until each is scored, so job start-up is not measured.

    Every partition: with --local_processes each process reads some of them
    and starts on its own.
    """
    producer = make_producer(config)
    encode = AvroEncoder(EVENT)
    partitions = sorted(producer.partitions_for(INPUT))
    warm = LineSimulator(SimulatorConfig(devices=1, seed=99, start_ms=int(time.time() * 1000))).events()
    waiting = set(partitions)
    sent: dict[int, set[str]] = {p: set() for p in partitions}
    deadline = time.time() + timeout_s
    while waiting:
        if time.time() > deadline:
            raise SystemExit(f"the job scored nothing from partitions {sorted(waiting)} within the start-up timeout")
        for partition in waiting:
            event, _ = next(warm)
            event = {**event, "device_id": f"warm-up-{partition}", "event_id": f"{event['event_id']}-p{partition}"}
            producer.send(INPUT, key=event["device_id"].encode(), value=encode(event), partition=partition,
                          timestamp_ms=event["event_time"])
            sent[partition].add(event["event_id"])
        producer.flush()
        time.sleep(1.0)
        waiting = {p for p in waiting if not sent[p] & watcher.seen_at.keys()}
    producer.close()


def measure(args: argparse.Namespace) -> dict:
    log = ROOT / "out" / "benchmarks" / "latency-job.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with local_broker(args.broker, ROOT / "out" / "benchmarks" / "kafka") as broker:
        config = KafkaConfig(broker.bootstrap_servers)
        ensure_topics(config, [INPUT, SCORES, "latency-dead", "latency-drift", "latency-retrain"], partitions=4)
        watcher = ScoreWatcher(config)
        print(f"job log: {log}", flush=True)
        job = start_job(broker.bootstrap_servers, " ".join([*job_flags(broker), args.job_args]), log)
        try:
            wait_until_scoring(config, watcher)
            print(f"job is scoring; feeding {args.rate:g} events/s for {args.seconds:g} s", flush=True)
            cpu_before = broker_cpu_seconds(broker)
            written = feed(config, args.rate, args.seconds, args.devices)
            deadline = time.time() + DRAIN_S
            while time.time() < deadline and not written.keys() <= watcher.seen_at.keys():
                time.sleep(0.2)
            broker_cpu_s = broker_cpu_seconds(broker) - cpu_before
        finally:
            job.send_signal(signal.SIGINT)
            job.wait(timeout=60)
            watcher.stop()
    latencies_ms = [(watcher.seen_at[e] - t) * 1000 for e, t in written.items() if e in watcher.seen_at]
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99]) if latencies_ms else (float("nan"),) * 3
    return {"broker": args.broker, "rate": args.rate, "seconds": args.seconds, "events": len(written),
            "scored": len(latencies_ms),
            "p50_ms": round(p50), "p95_ms": round(p95), "p99_ms": round(p99),
            "max_ms": round(max(latencies_ms, default=float("nan"))), "broker_cpu_s": round(broker_cpu_s, 1)}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second written (default 2000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to feed (default 30)")
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices (default 1000)")
    add_broker_argument(parser, "the benchmark")
    parser.add_argument("--job_args", default="--direct_num_workers 1 --local_processes 2",
                        help="extra job flags (default: two processes on this 2-core machine, each on the "
                             "in-process runner; docs/performance.md)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    figures = measure(_parse_args(argv))
    print(f"scored {figures['scored']}/{figures['events']}; latency p50 {figures['p50_ms']} ms, "
          f"p95 {figures['p95_ms']} ms, p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
