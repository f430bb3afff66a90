"""Throughput of the job against a plain kafka-python loop doing the same work, in one run.

    python -m benchmarks.throughput [--events N] [--devices D] [--broker tansu|kafka] [--job_args "..."]

Starts a broker (Tansu, or Apache Kafka), preloads N simulated events (the
standard schema, D devices, keyed by device), then measures, each in its own
Python process:

(a) the job, ``--bounded``, from process start to the last score written;
(b) the reference loop: consume, Avro decode, validate, the device step
    (imputation, calibration, LSTM step, evidence: the job's DeviceLogic),
    the scoring head over each poll's events, Avro encode, produce, flush.

It prints events/s of both, their ratio, CPU time per 1,000 events and peak
RSS of each process tree, and how long events waited from being written to
the topic until their score was
(preloaded: a backlog, so this is queueing, not the streaming latency; see
benchmarks/latency.py for that).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from beam_jobs.local_broker import add_broker_argument, job_flags, local_broker
from beam_jobs.simulator import LineSimulator, SimulatorConfig, produce
from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from schemas.serde import EVENT, SCORE, AvroDecoder, AvroEncoder, SerdeError
from transforms.decode import ValidationRules, ValidEvent, validation_error
from transforms.device_state import DeviceLogic, ScoringContext
from transforms.kafka_client import (
    KafkaConfig,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
    partitions_of,
    read_topic,
)
from transforms.offset_commits import SourcePosition
from transforms.scoring import score_record

INPUT, JOB_SCORES, LOOP_SCORES = "bench-events", "bench-scores-job", "bench-scores-loop"
PARTITIONS = 4
ROOT = Path(__file__).resolve().parents[1]


class TreeRss:
    """Peak resident memory of a process and its descendants, sampled from /proc."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self._pid, self._every_s = pid, every_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._every_s):
            self.peak_bytes = max(self.peak_bytes, sum(_rss(p) for p in _tree(self._pid)))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def _tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        kids = [int(c) for c in children.read_text().split()]
    except OSError:
        return []
    return [pid] + [p for kid in kids for p in _tree(kid)]


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def preload(config: KafkaConfig, events: int, devices: int) -> None:
    ensure_topics(config, [INPUT, JOB_SCORES, LOOP_SCORES, "bench-dead", "bench-drift", "bench-retrain"],
                  partitions=PARTITIONS)
    producer = make_producer(config)
    started = time.monotonic()
    produce(LineSimulator(SimulatorConfig(devices=devices, seed=11)), producer, INPUT, events, None,
            AvroEncoder(EVENT), progress=lambda n: print(f"  preloaded {n}", end="\r", flush=True))
    producer.close()
    print(f"preloaded {events} events for {devices} devices in {time.monotonic() - started:.1f} s", flush=True)


def timed_process(command: list[str], log: Path) -> tuple[float, float, int, float]:
    """(wall start, wall end, peak tree RSS, CPU seconds of the tree) of a child process; fails loudly if it fails.

    CPU seconds (user + system of the process and the children it waited for)
    move less than wall time on a shared machine: time the machine gives to
    others is not counted.
    """
    with open(log, "w") as out:
        started = time.time()
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        rss = TreeRss(child.pid)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        ended = time.time()
    peak = rss.stop()
    if child.returncode:
        raise SystemExit(f"{command[2]} exited with {child.returncode}; see {log}")
    return started, ended, peak, usage.ru_utime + usage.ru_stime


def read_processed_at(config: KafkaConfig, topic: str) -> list[tuple[str, int]]:
    """(event_id, processed_at) of every score on the topic."""
    decode = AvroDecoder(SCORE)
    return [(score["event_id"], score["processed_at"]) for score in (decode(r.value) for r in read_topic(config, topic))]


def reference_loop(bootstrap: str, model_dir: str, calibration_events: int, state_ttl_s: float) -> None:
    """The plain single-process loop: the job's work without Beam."""
    config = KafkaConfig(bootstrap)
    artifact = load_artifact(model_dir)
    logic = DeviceLogic.for_artifact(artifact, int(state_ttl_s * 1000), calibration_events)
    head = artifact.head()
    decode, encode = AvroDecoder(EVENT), AvroEncoder(SCORE)
    rules = ValidationRules()
    consumer, producer = make_consumer(config), make_producer(config)
    parts = partitions_of(consumer, INPUT)
    ends = end_offsets(consumer, parts)
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    states: dict[str, object] = {}
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        for tp, records in consumer.poll(timeout_ms=200, max_records=2000).items():
            contexts, rows = [], []
            for record in records:
                try:
                    event = decode(record.value)
                except SerdeError:
                    continue
                if validation_error(event, rules, int(time.time() * 1000)):
                    continue
                step = logic.on_event(states.get(event["device_id"]), event["event_time"], event["readings"],
                                      f"{tp.topic}:{tp.partition}")
                states[event["device_id"]] = step.state
                valid = ValidEvent(event["event_id"], event["device_id"], event["event_time"], event["readings"],
                                   SourcePosition(tp.topic, tp.partition, record.offset, record.offset),
                                   record.timestamp, record.key, record.value)
                contexts.append((event, ScoringContext(valid, step.imputed, step.calibrating, step.steps[0].model)))
                rows.append(step.model_input)
            if not rows:
                continue
            with torch.no_grad():
                outputs = head(torch.from_numpy(np.stack(rows))).numpy()
            now = int(time.time() * 1000)
            for (event, context), output in zip(contexts, outputs):
                score = score_record(context, output.tolist(), now)
                producer.send(LOOP_SCORES, key=event["device_id"].encode(), value=encode(score),
                              timestamp_ms=event["event_time"])
    producer.flush()
    producer.close()
    consumer.close()


def _percentiles(values_ms: list[float]) -> str:
    p = np.percentile(values_ms, [50, 95, 99]) / 1000.0
    return f"p50 {p[0]:.1f} s, p95 {p[1]:.1f} s, p99 {p[2]:.1f} s"


def measure(args: argparse.Namespace) -> dict:
    logs = ROOT / "out" / "benchmarks"
    logs.mkdir(parents=True, exist_ok=True)
    with local_broker(args.broker, ROOT / "out" / "benchmarks" / "kafka") as broker:
        config = KafkaConfig(broker.bootstrap_servers)
        preload(config, args.events, args.devices)
        written_at = time.time() * 1000  # every event is on the topic by now
        job = [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bounded", "--bootstrap_servers",
               broker.bootstrap_servers, "--input_topic", INPUT, "--score_topic", JOB_SCORES,
               "--dead_letter_topic", "bench-dead", "--drift_topic", "bench-drift", "--retrain_topic",
               "bench-retrain", "--consumer_group", "bench", "--start_from", "earliest",
               "--calibration_events", str(args.calibration_events), *job_flags(broker), *shlex.split(args.job_args)]
        print(f"job: {' '.join(job[2:])}", flush=True)
        job_start, job_end, job_rss, job_cpu = timed_process(job, logs / "throughput-job.log")
        job_scores = read_processed_at(config, JOB_SCORES)
        loop = [sys.executable, "-m", "benchmarks.throughput", "--_reference_loop", broker.bootstrap_servers,
                "--calibration_events", str(args.calibration_events)]
        print("reference loop ...", flush=True)
        loop_start, loop_end, loop_rss, loop_cpu = timed_process(loop, logs / "throughput-loop.log")
        loop_scores = read_processed_at(config, LOOP_SCORES)
    job_last = max(t for _, t in job_scores) / 1000.0
    figures = {
        "broker": args.broker,
        "events": args.events,
        "devices": args.devices,
        "job_scores": len({e for e, _ in job_scores}),
        "loop_scores": len({e for e, _ in loop_scores}),
        "job_events_per_s": round(args.events / (job_last - job_start)),
        "job_events_per_s_excluding_startup": round(args.events / (job_last - min(t for _, t in job_scores) / 1000)),
        "loop_events_per_s": round(args.events / (loop_end - loop_start)),
        "job_cpu_ms_per_1000_events": round(job_cpu * 1e6 / args.events),
        "loop_cpu_ms_per_1000_events": round(loop_cpu * 1e6 / args.events),
        "job_peak_rss_mb": round(job_rss / 2**20),
        "loop_peak_rss_mb": round(loop_rss / 2**20),
        "job_wait_written_to_scored": _percentiles([t - written_at for _, t in job_scores]),
    }
    figures["ratio_job_to_loop"] = round(figures["job_events_per_s"] / figures["loop_events_per_s"], 3)
    return figures


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to preload (default 200000)")
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices (default 1000)")
    parser.add_argument("--calibration_events", type=int, default=60, help="per-device calibration (default 60)")
    add_broker_argument(parser, "the benchmark")
    parser.add_argument("--job_args", default="--direct_num_workers 1 --local_processes 2",
                        help="extra job flags (default: two job processes on this 2-core machine, each on the "
                             "in-process runner; docs/performance.md says why Beam's own workers are slower)")
    parser.add_argument("--_reference_loop", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args._reference_loop:
        reference_loop(args._reference_loop, str(BUNDLED_MODEL_DIR), args.calibration_events, 600.0)
        return
    figures = measure(args)
    print(f"job:  {figures['job_events_per_s']:>7} events/s  (peak RSS {figures['job_peak_rss_mb']} MB)")
    print(f"loop: {figures['loop_events_per_s']:>7} events/s  (peak RSS {figures['loop_peak_rss_mb']} MB)")
    print(f"ratio job/loop: {figures['ratio_job_to_loop']}")
    print(f"CPU per 1,000 events: job {figures['job_cpu_ms_per_1000_events']} ms (all its processes, start-up "
          f"and drift merge included), loop {figures['loop_cpu_ms_per_1000_events']} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
