"""Runs the whole product on one machine: broker, simulated line, job, live view.

    python -m beam_jobs.local_run [--events N] [--devices D] [--speed S] [--broker tansu|kafka] [-- JOB FLAGS...]

Starts a broker unless KAFKA_BOOTSTRAP_SERVERS is set: the embedded Tansu by
default (0.1 s, no Java), or Apache Kafka with ``--broker kafka`` (about 7 s;
data and logs in out/kafka/). Then it creates the topics, feeds the
manufacturing-line simulator, runs the scoring job on the DirectRunner in a
child process (its log goes to out/job.log) and prints progress every two
seconds. With --events N it stops once N events are scored and prints, as its
last line, one JSON object of the run's figures.

The Kafka security flags (before any --) apply to this tool's own clients and
are passed on to the job; they need KAFKA_BOOTSTRAP_SERVERS: the broker this
tool starts is reached over PLAINTEXT (``python -m beam_jobs.kafka_cluster``
keeps an Apache Kafka with TLS and SASL listeners running for that).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from beam_jobs.kafka_cluster import KafkaNotInstalled
from beam_jobs.local_broker import add_broker_argument, job_flags, local_broker
from beam_jobs.security_options import (
    KAFKA_SECURITY_OPTIONS,
    add_kafka_security_arguments,
    kafka_security,
    kafka_security_argv,
)
from beam_jobs.simulator import LineSimulator, SimulatorConfig, produce
from schemas.serde import EVENT, SCORE, AvroDecoder, AvroEncoder
from transforms.kafka_client import (
    KafkaConfig,
    KafkaSecurityError,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
    partitions_of,
)

TOPICS = {"input": "sensor-events", "scores": "sensor-scores", "dead": "sensor-dead-letters", "drift": "sensor-drift"}
GROUP = "sensor-scoring"
STATUS_EVERY_S = 2.0
METRICS_PORT = 9108  # the job's Prometheus endpoint in local runs; its status lines are in the job log


class TopicCounter:
    """Counts what arrives on the score and dead-letter topics after start-up."""

    def __init__(self, config: KafkaConfig):
        self._consumer = make_consumer(config)
        self._decode_score = AvroDecoder(SCORE)
        parts = partitions_of(self._consumer, TOPICS["scores"]) + partitions_of(self._consumer, TOPICS["dead"])
        starts = end_offsets(self._consumer, parts)
        self._consumer.assign(parts)
        for tp, offset in starts.items():
            self._consumer.seek(tp, offset)
        self.scored_ids: set[str] = set()
        self.anomaly_ids: set[str] = set()
        self.dead_letters = 0

    def poll(self, timeout_ms: int = 500) -> None:
        for tp, records in self._consumer.poll(timeout_ms=timeout_ms, max_records=5000).items():
            if tp.topic == TOPICS["dead"]:
                self.dead_letters += len(records)
                continue
            for record in records:
                score = self._decode_score(record.value)
                self.scored_ids.add(score["event_id"])
                if score["is_anomaly"]:
                    self.anomaly_ids.add(score["event_id"])

    def close(self) -> None:
        self._consumer.close()


class LagProbe:
    """Input records not yet committed by the job's consumer group, on one reused connection."""

    def __init__(self, config: KafkaConfig):
        self._consumer = make_consumer(config, group_id=GROUP)
        self._parts = partitions_of(self._consumer, TOPICS["input"])

    def lag(self) -> int:
        ends = self._consumer.end_offsets(self._parts)
        return sum(max(0, ends[tp] - (self._consumer.committed(tp) or 0)) for tp in self._parts)

    def close(self) -> None:
        self._consumer.close()


def start_job(bootstrap: str, job_args: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    metrics = [] if any(a.startswith("--metrics_port") for a in job_args) else ["--metrics_port", str(METRICS_PORT)]
    command = [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bootstrap_servers", bootstrap, *metrics, *job_args]
    log = open(log_path, "w", encoding="utf-8")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def stop_job(job: subprocess.Popen) -> None:
    if job.poll() is None:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait()


def simulator_of(args: argparse.Namespace) -> LineSimulator:
    return LineSimulator(SimulatorConfig(devices=args.devices, rate_hz=args.rate, seed=args.seed))


def faulty_event_ids(args: argparse.Namespace, count: int) -> set[str]:
    """The simulator's ground truth for the first `count` events sent, so the summary can judge the anomalies."""
    return {event["event_id"] for event, is_fault in simulator_of(args).take(count) if is_fault}


def feed(config: KafkaConfig, args: argparse.Namespace, sent: list[int]) -> None:
    """Produces simulated events; `sent[0]` is the running count."""
    simulator = simulator_of(args)
    producer = make_producer(config)
    real_time_rate = args.devices * args.rate * args.speed
    try:
        sent[0] = produce(simulator, producer, TOPICS["input"], args.events, real_time_rate, AvroEncoder(EVENT),
                          progress=lambda n: sent.__setitem__(0, n))
    finally:
        producer.close()


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="./run_local.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=None, help="stop after N events are scored (default: run on)")
    # 10 machines: --events 3000 then gives each 300 events, 180 of them scored after the default calibration.
    parser.add_argument("--devices", type=int, default=10, help="simulated machines (default 10)")
    parser.add_argument("--rate", type=float, default=1.0, help="readings per machine per event-time second")
    parser.add_argument("--speed", type=float, default=50.0,
                        help="event-time seconds per wall-clock second (default 50: a 10-machine line sends 500/s)")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    parser.add_argument("--timeout_s", type=float, default=600.0, help="give up after this long (default 600)")
    parser.add_argument("--log", type=Path, default=Path("out/job.log"), help="job log file (default out/job.log)")
    add_broker_argument(parser, "run_local.sh")
    add_kafka_security_arguments(parser)
    args, job_args = parser.parse_known_args(argv)
    # After --, a security flag would reach the job only, and this tool's own clients could not connect.
    misplaced = {flag for flag, _, _ in KAFKA_SECURITY_OPTIONS} & {a.split("=")[0] for a in job_args}
    if misplaced:
        parser.error(f"give {', '.join(sorted(misplaced))} before --: they apply to this tool and the job")
    return args, [a for a in job_args if a != "--"]


def main(argv: list[str] | None = None) -> int:
    args, job_args = _parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    try:
        security = kafka_security(args)
        security.client_kwargs()  # reads the SASL password now: a missing one stops the run before anything starts
    except KafkaSecurityError as e:
        print(f"run_local failed: {e}", file=sys.stderr)
        return 2
    if security.protocol != "PLAINTEXT" and not bootstrap:
        print(f"run_local failed: --security_protocol {security.protocol} needs KAFKA_BOOTSTRAP_SERVERS; "
              "the broker run_local.sh starts is reached over PLAINTEXT", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        broker = None
        if not bootstrap:
            try:
                broker = stack.enter_context(local_broker(args.broker, Path("out/kafka")))
            except KafkaNotInstalled as e:
                print(f"run_local failed: {e}", file=sys.stderr)
                return 2
            bootstrap = broker.bootstrap_servers
            print(f"started the {'Apache Kafka' if args.broker == 'kafka' else 'embedded Tansu'} broker on "
                  f"{bootstrap}", flush=True)
        config = KafkaConfig(bootstrap, security=security)
        ensure_topics(config, TOPICS.values())
        counter = TopicCounter(config)
        stack.callback(counter.close)
        lag_probe = LagProbe(config)
        stack.callback(lag_probe.close)
        job = start_job(bootstrap, [*kafka_security_argv(security), *job_flags(broker), *job_args], args.log)
        stack.callback(stop_job, job)
        print(f"job started (pid {job.pid}, log {args.log}); feeding {args.devices} simulated machines", flush=True)
        print(f"live status lines in {args.log}; Prometheus metrics on http://localhost:{METRICS_PORT}/metrics "
              "unless -- --metrics_port says otherwise", flush=True)
        sent = [0]
        feeder = threading.Thread(target=feed, args=(config, args, sent), daemon=True)
        feeder.start()
        started = time.monotonic()
        last_status = started
        while True:
            counter.poll()
            elapsed = time.monotonic() - started
            if args.events is not None and len(counter.scored_ids) >= args.events:
                break
            if job.poll() is not None:
                print(f"the job exited with code {job.returncode}; see {args.log}", file=sys.stderr)
                return 1
            if elapsed > args.timeout_s:
                print(f"timed out after {args.timeout_s:.0f} s; see {args.log}", file=sys.stderr)
                return 1
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                last_status = time.monotonic()
                print(f"[{elapsed:6.1f}s] events in {sent[0]:>7} | scores out {len(counter.scored_ids):>7} | "
                      f"anomalies {len(counter.anomaly_ids):>5} | dead letters {counter.dead_letters:>4} | "
                      f"lag {lag_probe.lag():>6}", flush=True)
        feeder.join(timeout=30)
        faulty = faulty_event_ids(args, sent[0])
        summary = {"events_in": sent[0], "scores_out": len(counter.scored_ids), "dead_letters": counter.dead_letters,
                   "anomalies": len(counter.anomaly_ids), "anomalies_on_faults": len(counter.anomaly_ids & faulty),
                   "faulty_events": len(faulty), "elapsed_s": round(time.monotonic() - started, 2),
                   "bootstrap_servers": bootstrap}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
