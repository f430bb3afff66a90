"""--local_processes N against the real broker: N scoring processes on disjoint partitions plus a drift merger.

The scoring processes each read some input partitions and write drift
partial summaries to an internal topic; the merger closes the fleet-wide
windows (beam_jobs/local_processes.py, beam_jobs/drift_merge.py). Checked
here: the split and the partials' wire form, that a bounded run with two
processes writes what one process writes, that an unknown --input_partitions
partition stops the job, and that a streaming run closes each window once
and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from beam_jobs import sensor_scoring
from beam_jobs.local_processes import split_partitions
from beam_jobs.simulator import LineSimulator, SimulatorConfig, produce
from models.artifact import BUNDLED_MODEL_DIR
from models.drift_reference import SCORE_FEATURE, load_reference
from schemas.serde import DRIFT, DRIFT_PARTIAL, EVENT, RETRAIN, SCORE, AvroDecoder, AvroEncoder
from tests.kafka_helpers import committed_offsets, produce_all, read_all
from tests.test_job import ROOT, _wait_for
from transforms.drift_partials import PartialSummary
from transforms.drift_stats import WindowSummary
from transforms.kafka_client import (
    PartitionDescriptor,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
    partitions_of,
)

START_MS = 1_700_000_040_000  # a multiple of 60 s (and of the windows below): windows start with the stream
DEVICES = 10  # keyed by device id, 10 simulated devices land on all 4 partitions (partition 1 has one)
PARTITIONS = 4
FEATURES = ("temperature", "vibration", "current", "pressure", "flow", "voltage", SCORE_FEATURE)
JOB_TIMEOUT_S = 240


# --- unit level -------------------------------------------------------------------------------------------------


def _descriptors(n: int) -> list[PartitionDescriptor]:
    return [PartitionDescriptor("t", p, 10 * p, None) for p in range(n)]


@pytest.mark.parametrize("partitions, processes, expected", [
    (4, 2, [[0, 2], [1, 3]]),
    (5, 2, [[0, 2, 4], [1, 3]]),
    (7, 3, [[0, 3, 6], [1, 4], [2, 5]]),
    (4, 4, [[0], [1], [2], [3]]),
    (2, 5, [[0], [1]]),  # never more processes than partitions
    (3, 1, [[0, 1, 2]]),
    (3, 0, [[0, 1, 2]]),
])
def test_split_partitions_is_round_robin_and_never_more_groups_than_partitions(partitions, processes, expected):
    descriptors = _descriptors(partitions)
    groups = split_partitions(descriptors, processes)
    assert [[p.partition for p in group] for group in groups] == expected
    assert len(groups) == min(max(processes, 1), partitions)
    assert all(groups)  # no process without a partition
    assert sorted(itertools.chain.from_iterable(groups)) == descriptors  # disjoint, complete, descriptors unchanged


def _assert_same_partial(got: PartialSummary, want: PartialSummary) -> None:
    assert (got.feature, got.window_start, got.partition, got.evidence_ms, got.bundle) == \
           (want.feature, want.window_start, want.partition, want.evidence_ms, want.bundle)
    a, b = got.summary, want.summary
    assert (a.events, a.missing) == (b.events, b.missing)
    for name in ("psi_counts", "ks_counts", "device_ids", "device_n", "device_mean", "device_m2"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype.kind == y.dtype.kind, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_a_partial_summary_round_trips_through_drift_partial_avro_bytes():
    reference = load_reference(BUNDLED_MODEL_DIR).features["pressure"]
    rng = np.random.default_rng(5)
    devices = ["line1-press-000", "line1-pump-001", "gerät-ü-7", "z"]  # a non-ASCII id: UTF-8 both ways
    ids = [devices[i % len(devices)] for i in range(200)]
    values = [None if i % 17 == 0 else float(rng.normal(reference.mean, 3 * reference.std)) for i in range(200)]
    summary = WindowSummary.empty(reference)
    summary.add_many(reference, ids, values)
    partial = PartialSummary("pressure", START_MS, "events:3", START_MS + 61_234, "ab12" * 8, summary)
    assert summary.missing == 12 and len(summary.device_ids) == 4 and summary.psi_counts.sum() == 188

    payload = AvroEncoder(DRIFT_PARTIAL)(partial.to_record())
    assert isinstance(payload, bytes)
    back = PartialSummary.from_record(AvroDecoder(DRIFT_PARTIAL)(payload))
    _assert_same_partial(back, partial)
    # The decoded summary behaves as the original: merged into an empty one, it gives the same devices.
    merged = WindowSummary.empty(reference).merge(back.summary)
    assert merged.devices.keys() == summary.devices.keys()
    assert [m.__getstate__() for m in merged.devices.values()] == [m.__getstate__() for m in summary.devices.values()]

    empty = PartialSummary("__score__", 0, "events:0", 0, "", WindowSummary.empty(reference))
    _assert_same_partial(PartialSummary.from_record(AvroDecoder(DRIFT_PARTIAL)(
        AvroEncoder(DRIFT_PARTIAL)(empty.to_record()))), empty)


# --- the job as processes -----------------------------------------------------------------------------------------


def _job_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "beam_jobs.sensor_scoring", *args]


def _job_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run_job(log: Path, *args: str) -> int:
    """Runs the job's command line to its end; its output goes to `log`."""
    with open(log, "w") as out:
        return subprocess.run(_job_command(*args), cwd=ROOT, env=_job_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=JOB_TIMEOUT_S).returncode


def _topics(kafka_config, names, run: str, input_topic: str) -> list[str]:
    """One run's broker, its own output topics and group, and the shared input topic."""
    return ["--bootstrap_servers", kafka_config.bootstrap_servers, "--input_topic", input_topic,
            "--score_topic", names(f"{run}-scores"), "--dead_letter_topic", names(f"{run}-dead"),
            "--drift_topic", names(f"{run}-drift"), "--retrain_topic", names(f"{run}-retrain"),
            "--consumer_group", names(f"{run}-group")]


def _drift_by_window(kafka_config, topic: str) -> dict[tuple[str, int], dict]:
    """DriftStatistics by (feature, window_start), checked to be one record per feature and window."""
    records = [r[3] for r in read_all(kafka_config, topic, AvroDecoder(DRIFT))]
    duplicates = [k for k, n in Counter((r["feature"], r["window_start"]) for r in records).items() if n > 1]
    assert not duplicates, f"more than one record for {duplicates}"
    return {(r["feature"], r["window_start"]): r for r in records}


def _assert_same_drift(got: dict, want: dict) -> None:
    for field, value in want.items():
        if isinstance(value, float):
            assert got[field] == pytest.approx(value, rel=1e-9, abs=1e-12), (field, got, want)
        else:
            assert got[field] == value, (field, got, want)


@pytest.mark.slow
def test_two_bounded_processes_write_what_one_process_writes(kafka_config, topic_names, tmp_path):
    window_s, steps = 20, 200
    events = DEVICES * steps
    input_topic = topic_names("in")
    ensure_topics(kafka_config, [input_topic], partitions=PARTITIONS)
    simulator = LineSimulator(SimulatorConfig(devices=DEVICES, seed=11, start_ms=START_MS))
    producer = make_producer(kafka_config)
    assert produce(simulator, producer, input_topic, events, None, AvroEncoder(EVENT)) == events
    producer.close()
    assert {r[0] for r in read_all(kafka_config, input_topic)} == set(range(PARTITIONS)), "input on every partition"
    common = ["--bounded", "--start_from", "committed", "--calibration_events", "20",
              "--drift_window_s", str(window_s), "--retrain_after_windows", "2", "--direct_num_workers", "1"]

    sensor_scoring.run([*common, *_topics(kafka_config, topic_names, "one", input_topic), "--local_processes", "1"])
    log = tmp_path / "two.log"
    code = _run_job(log, *common, *_topics(kafka_config, topic_names, "two", input_topic), "--local_processes", "2")
    output = log.read_text()
    assert code == 0, output
    assert re.search(r"scoring-0 \(pid \d+\): partitions 0,2 ", output), output
    assert re.search(r"scoring-1 \(pid \d+\): partitions 1,3 ", output), output
    assert re.search(r"drift-merge \(pid \d+\)", output), output

    # Scores: every event once, each as the single process scored it.
    one = {s["event_id"]: s for *_, s in read_all(kafka_config, topic_names("one-scores"), AvroDecoder(SCORE))}
    two_ids = [s["event_id"] for *_, s in read_all(kafka_config, topic_names("two-scores"), AvroDecoder(SCORE))]
    assert len(two_ids) == len(set(two_ids)) == events, Counter(two_ids).most_common(3)
    two = {s["event_id"]: s for *_, s in read_all(kafka_config, topic_names("two-scores"), AvroDecoder(SCORE))}
    assert two.keys() == one.keys() == {e["event_id"] for e, _ in simulator.take(events)}
    differing = [i for i in one if not math.isclose(two[i]["score"], one[i]["score"], rel_tol=1e-9, abs_tol=1e-12)
                 or two[i]["is_anomaly"] != one[i]["is_anomaly"]]
    assert not differing, [(i, one[i]["score"], two[i]["score"]) for i in differing[:5]]

    # Each process committed its own partitions' offsets.
    consumer = make_consumer(kafka_config)
    ends = {tp.partition: end for tp, end in end_offsets(consumer, partitions_of(consumer, input_topic)).items()}
    consumer.close()
    assert committed_offsets(kafka_config, input_topic, topic_names("two-group")) == ends

    # The merger closed the fleet-wide windows from partials of every input partition.
    partials = [r[3] for r in read_all(kafka_config, topic_names("two-drift") + "-partials",
                                       AvroDecoder(DRIFT_PARTIAL))]
    assert {p["partition"] for p in partials} == {f"{input_topic}:{p}" for p in range(PARTITIONS)}

    # Drift: the same records, window by window.
    windows = steps // window_s
    drift_one = _drift_by_window(kafka_config, topic_names("one-drift"))
    drift_two = _drift_by_window(kafka_config, topic_names("two-drift"))
    expected = {(f, START_MS + w * window_s * 1000) for f in FEATURES for w in range(windows)}
    assert drift_one.keys() == expected
    assert drift_two.keys() == expected
    for key, record in drift_one.items():
        assert record["count"] == DEVICES * window_s, record
        _assert_same_drift(drift_two[key], record)
    retrain_one = sorted(str(r[3]) for r in read_all(kafka_config, topic_names("one-retrain"), AvroDecoder(RETRAIN)))
    retrain_two = sorted(str(r[3]) for r in read_all(kafka_config, topic_names("two-retrain"), AvroDecoder(RETRAIN)))
    assert retrain_two == retrain_one


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_an_input_partition_the_topic_does_not_have_stops_the_job(kafka_config, topic_names, tmp_path, processes):
    input_topic = topic_names("in")
    ensure_topics(kafka_config, [input_topic], partitions=2)
    log = tmp_path / "job.log"
    code = _run_job(log, "--bounded", *_topics(kafka_config, topic_names, "run", input_topic),
                    "--input_partitions", "1,5", "--local_processes", str(processes))
    output = log.read_text()
    assert code == 2, output
    assert re.search(r"no partition 5\b", output), output
    assert "(pid" not in output, "no process was started"


# --- streaming ------------------------------------------------------------------------------------------------


def _scored_ids(kafka_config, topic: str) -> set[str]:
    return {s["event_id"] for *_, s in read_all(kafka_config, topic, AvroDecoder(SCORE))}


def _wait_until_every_partition_scores(kafka_config, input_topic: str, score_topic: str, start_ms: int,
                                       job: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    """Sends warm-up events to each input partition explicitly until one of each is scored (benchmarks/latency.py).

    Each process of the job starts on its own and reads from the end it finds
    then (--start_from latest), so a partition is ready only once it scores.
    The warm-up events' event times start at `start_ms`, long before the
    stream under test, so they close no window of it.
    """
    producer = make_producer(kafka_config)
    encode = AvroEncoder(EVENT)
    warm = LineSimulator(SimulatorConfig(devices=1, seed=99, start_ms=start_ms)).events()
    waiting = set(range(PARTITIONS))
    sent: dict[int, set[str]] = {p: set() for p in waiting}
    deadline = time.monotonic() + timeout_s
    try:
        while waiting:
            assert job.poll() is None, log.read_text()
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing scored from partitions {sorted(waiting)} after {timeout_s:.0f} s:\n"
                                     + log.read_text())
            for partition in sorted(waiting):
                event, _ = next(warm)
                event = {**event, "device_id": f"warm-up-{partition}",
                         "event_id": f"{event['event_id']}-p{partition}"}
                producer.send(input_topic, key=event["device_id"].encode(), value=encode(event), partition=partition,
                              timestamp_ms=event["event_time"])
                sent[partition].add(event["event_id"])
            producer.flush()
            time.sleep(1.0)
            scored = _scored_ids(kafka_config, score_topic)
            waiting = {p for p in waiting if not sent[p] & scored}
    finally:
        producer.close()


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _kill(job: subprocess.Popen, children: list[int]) -> list[int]:
    """Kills the launcher and those of its `children` still running (a failed test leaves none); returns those."""
    if job.poll() is None:
        job.kill()
        job.wait()
    left = [pid for pid in children if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_a_streaming_job_of_two_processes_closes_each_window_once_and_stops_on_sigterm(
        kafka_config, topic_names, tmp_path):
    """Unbounded: windows close on evidence from every partition, one record each, as the events arrive.

    The events come as a live line sends them, half a window of event time
    at a time, each once the last is scored: a window closes once every
    partition has shown, in a later read, evidence past its end
    (transforms/drift.py), so of the five windows sent four close.
    """
    window_s, windows = 30, 5
    input_topic = topic_names("in")
    ensure_topics(kafka_config, [input_topic], partitions=PARTITIONS)
    events = [e for e, _ in LineSimulator(SimulatorConfig(devices=DEVICES, seed=13, start_ms=START_MS))
              .take(DEVICES * window_s * windows)]
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            _job_command(*_topics(kafka_config, topic_names, "run", input_topic), "--start_from", "latest",
                         "--calibration_events", "20", "--drift_window_s", str(window_s),
                         "--direct_num_workers", "1", "--local_processes", "2"),
            cwd=ROOT, env=_job_env(), stdout=out, stderr=subprocess.STDOUT)
    children: list[int] = []
    try:
        _wait_until_every_partition_scores(kafka_config, input_topic, topic_names("run-scores"),
                                           START_MS - 3600_000, job, log)
        children = _children(job.pid)
        assert len(children) == 3, (children, log.read_text())  # two scoring processes and the merger
        encode = AvroEncoder(EVENT)
        chunk = DEVICES * window_s // 2
        for sent in range(chunk, len(events) + 1, chunk):
            produce_all(kafka_config, input_topic,
                        [(e["device_id"].encode(), encode(e), e["event_time"]) for e in events[sent - chunk:sent]])
            wanted = {e["event_id"] for e in events[:sent]}
            _wait_for(lambda wanted=wanted: wanted <= _scored_ids(kafka_config, topic_names("run-scores")), 120,
                      f"the first {sent} scores")
        assert {r[0] for r in read_all(kafka_config, input_topic)} == set(range(PARTITIONS))

        closed = {(f, START_MS + w * window_s * 1000) for f in FEATURES for w in range(windows - 1)}
        _wait_for(lambda: closed <= _drift_by_window(kafka_config, topic_names("run-drift")).keys(), 120,
                  "the closed windows' statistics")
        time.sleep(3.0)  # a duplicate from the other process would come about now
        drift = _drift_by_window(kafka_config, topic_names("run-drift"))
        assert job.poll() is None, log.read_text()
    finally:
        children = children or _children(job.pid)
        job.send_signal(signal.SIGTERM)
        try:
            code = job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        left = _kill(job, children)

    output = log.read_text()
    assert code == 0, output
    assert not left, f"processes {left} outlived the launcher:\n{output}"
    stream = {k: r for k, r in drift.items() if k[1] >= START_MS}
    assert stream.keys() == closed, sorted(stream.keys() - closed)  # the last window waits for later data
    for record in stream.values():
        assert record["count"] == DEVICES * window_s, record
    # The warm-up windows, an hour before the stream, closed too (their counts depend on the start-up).
    assert {f for f, start in drift if start < START_MS} == set(FEATURES)
    # Still one record per window after the drain, and the closed windows as they were.
    after = _drift_by_window(kafka_config, topic_names("run-drift"))
    assert after.keys() >= drift.keys()
    assert all(after[k]["count"] == r["count"] for k, r in stream.items())
