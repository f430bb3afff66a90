"""Delivery under faults: a late broker, a paused broker, SIGKILLs, and a graceful stop.

Each test runs the real streaming job as a child process against its own
Apache Kafka node (the broker is paused or started late, so it cannot be the
session's), and checks afterwards that every valid input has a score and
that the job committed every offset. Figures are printed (pytest -s). Kafka,
not Tansu: how a broker holds fetches, fences a paused node and answers
commits decides what is re-read and how fast the job recovers.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from beam_jobs.kafka_cluster import KafkaCluster
from schemas.serde import SCORE, AvroDecoder
from tests.kafka_helpers import committed_offsets, produce_all, read_all
from tests.test_job import ROOT, _avro, _schema, _wait_for, malformed_messages, outside_events
from transforms.kafka_client import KafkaConfig, end_offsets, ensure_topics, make_consumer, partitions_of

TOPICS = {"--input_topic": "in", "--score_topic": "scores", "--dead_letter_topic": "dead", "--drift_topic": "drift",
          "--consumer_group": "group"}


def start_job(bootstrap: str, log: Path, *extra: str) -> subprocess.Popen:
    """The streaming job in a child process, resuming from committed offsets."""
    args = [a for flag, name in TOPICS.items() for a in (flag, name)]
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bootstrap_servers", bootstrap, *args, *extra],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)


def stop_gracefully(job: subprocess.Popen, log: Path) -> None:
    """SIGTERM drains the job: it must end by itself, with exit code 0."""
    job.send_signal(signal.SIGTERM)
    try:
        assert job.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()


def produce_events(config: KafkaConfig, events: list[dict], bad: list[bytes] = ()) -> None:
    schema = _schema("sensor_event.avsc")
    messages = [(e["device_id"].encode(), _avro(schema, e), e["event_time"]) for e in events]
    produce_all(config, "in", messages + [(b"bad", value, None) for value in bad])


def input_ends(config: KafkaConfig) -> dict[int, int]:
    consumer = make_consumer(config)
    try:
        return {tp.partition: end for tp, end in end_offsets(consumer, partitions_of(consumer, "in")).items()}
    finally:
        consumer.close()


def has_input_topic(config: KafkaConfig) -> bool:
    consumer = make_consumer(config)
    try:
        return "in" in consumer.topics()
    finally:
        consumer.close()


def all_committed(config: KafkaConfig) -> bool:
    """Every partition committed to its end; an empty partition never needs a commit."""
    committed = committed_offsets(config, "in", "group")
    return {p: offset or 0 for p, offset in committed.items()} == input_ends(config)


def scored_ids(config: KafkaConfig) -> Counter:
    return Counter(s["event_id"] for *_, s in read_all(config, "scores", AvroDecoder(SCORE)))


@pytest.mark.slow
def test_job_waits_for_a_broker_that_starts_late(tmp_path):
    broker = KafkaCluster(folder=tmp_path / "kafka")  # its ports are chosen now, it starts later
    config = broker.config()
    log = tmp_path / "job.log"
    job = start_job(config.bootstrap_servers, log, "--startup_timeout_s", "60")
    try:
        time.sleep(10)
        assert job.poll() is None, log.read_text()
        with broker:
            _wait_for(lambda: has_input_topic(config), 60, "the job to create its topics")
            events = outside_events(devices=3, per_device=20)
            produce_events(config, events)
            _wait_for(lambda: sum(scored_ids(config).values()) >= len(events) and all_committed(config), 90,
                      "every event scored and committed")
            stop_gracefully(job, log)
    finally:
        if job.poll() is None:
            job.kill()
    retries = [line for line in log.read_text().splitlines() if "retrying in" in line]
    print(f"\n{len(retries)} logged retries before the broker came up; first: {retries[0]}")
    assert retries and "no Kafka broker answered" in retries[0] and "retrying in" in retries[0]


@pytest.mark.slow
def test_job_rides_out_a_paused_broker(tmp_path):
    """SIGSTOP mid-stream for 15 s: requests in flight stall and time out or resume; nothing is lost."""
    log = tmp_path / "job.log"
    with KafkaCluster(folder=tmp_path / "kafka") as broker:
        config = broker.config()
        ensure_topics(config, ["in"], partitions=2)
        events = outside_events(devices=20, per_device=150)
        produce_events(config, events[:2500])
        job = start_job(broker.bootstrap_servers, log)
        try:
            _wait_for(lambda: sum(scored_ids(config).values()) >= 300, 90, "the job to be under way")
            os.kill(broker.pid(), signal.SIGSTOP)
            time.sleep(15)
            os.kill(broker.pid(), signal.SIGCONT)
            resumed = time.monotonic()
            produce_events(config, events[2500:])
            _wait_for(lambda: sum(scored_ids(config).values()) >= len(events) and all_committed(config), 120,
                      "every event scored and committed after the pause")
            print(f"\nafter a 15 s SIGSTOP mid-stream: all {len(events)} events scored and committed "
                  f"{time.monotonic() - resumed:.1f} s after SIGCONT")
            assert job.poll() is None, log.read_text()[-3000:]
            stop_gracefully(job, log)
        finally:
            if job.poll() is None:
                job.kill()
        assert set(scored_ids(config)) == {e["event_id"] for e in events}


@pytest.mark.slow
def test_sigkilled_three_times_every_valid_event_is_scored(tmp_path):
    """The done-when test: 30,000 events, three SIGKILLs at random points, restarts from committed offsets."""
    rng = random.Random(5)
    log = tmp_path / "job.log"
    events = outside_events(devices=50, per_device=600, seed=5)
    bad = malformed_messages(300, _schema("sensor_event.avsc"))
    started = time.monotonic()
    with KafkaCluster(folder=tmp_path / "kafka") as broker:
        config = broker.config()
        ensure_topics(config, ["in", "scores"], partitions=4)
        produce_events(config, events, bad)
        consumer = make_consumer(config)
        score_parts = partitions_of(consumer, "scores")

        def scores_written() -> int:
            return sum(end_offsets(consumer, score_parts).values())

        kills = []
        for low, high in ((0.05, 0.3), (0.35, 0.6), (0.65, 0.9)):
            target = int(rng.uniform(low, high) * len(events))
            job = start_job(broker.bootstrap_servers, log)
            try:
                _wait_for(lambda: scores_written() >= target or job.poll() is not None, 150, f"{target} scores")
                assert job.poll() is None, log.read_text()[-3000:]
            finally:
                job.kill()
                job.wait()
            kills.append(scores_written())
        job = start_job(broker.bootstrap_servers, log)
        try:
            _wait_for(lambda: all_committed(config), 150, "every offset committed after the last restart")
            stop_gracefully(job, log)
        finally:
            if job.poll() is None:
                job.kill()
        consumer.close()
        scored = scored_ids(config)
    missing = {e["event_id"] for e in events} - set(scored)
    duplicates = sum(scored.values()) - len(scored)
    print(f"\n{len(events)} events + {len(bad)} bad ones, SIGKILLs after {kills} score records: "
          f"{len(scored)} event ids scored, {duplicates} duplicate scores ({duplicates / len(scored):.1%}), "
          f"{len(missing)} missing, {time.monotonic() - started:.0f} s in all")
    assert not missing
