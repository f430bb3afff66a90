"""The job on Flink (``--flink_master '[local]'``: a MiniCluster inside the job server JVM).

``--runner FlinkRunner --flink_master '[local]' --environment_type LOOPBACK``
with no other flag: scripts/fetch_flink.sh (run by scripts/ensure_venv.sh)
puts the job server in Beam's jar cache and beam_jobs/flink_runner.py finds
it. That job server is Beam 2.62.0 on Flink 1.19, the newest served here
(docs/flink.md), behind this 2.77 SDK.

What runs: file mode, byte-identical to the in-process runner; a bounded
Kafka job's scores, byte-identical too; the streaming job with
checkpointing every second: every event scored (identically), drift
windows and retrain triggers as in a bounded run, offsets committed while it
runs from bundle finalizers after checkpoints, idle devices reclaimed. Flink
runs a bounded job as a batch job, whose stages have no bundle finalization
(registering one fails the job): there the job leaves the commit step out
and commits the end offsets once the job has succeeded. On a standalone
cluster (deploy/start_flink_cluster.sh): file mode with parallelism 2 gives
the same scores; deploy/launch_flink.sh's streaming job keeps device state
across a stop with a savepoint, and loses no event when a TaskManager is
killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from kafka import KafkaProducer

from beam_jobs import sensor_scoring
from beam_jobs.embedded_broker import free_port
from beam_jobs.flink_runner import FETCHED_BEAM_VERSION, FETCHED_FLINK_VERSION, job_server_jar
from beam_jobs.recordings import write_events
from beam_jobs.replay import replay
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from tests.kafka_helpers import committed_offsets, read_all
from transforms.kafka_client import ensure_topics, read_topic
from tests.runner_helpers import (
    EVENTS,
    JobProcess,
    all_committed,
    assert_identical,
    file_scores,
    kafka_job_args,
    kafka_scores,
    no_runner_left_behind,  # noqa: F401 (a fixture)
    record_line,
    score_files,
)
from tests.test_event_time_job import drift_records, metric, retrain_triggers

FLINK = ["--runner", "FlinkRunner", "--flink_master", "[local]", "--environment_type", "LOOPBACK"]
# Checkpoints every 5 s; the [local] streaming test takes one every second, so that one lands in the partition
# list's only bundle: without --finish_bundle_before_checkpointing (beam_jobs/flink_runner.py) that job read nothing.
CHECKPOINT_MS = "5000"
FLEET_EVENTS = 6000
pytestmark = pytest.mark.usefixtures("no_runner_left_behind")


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    jar = job_server_jar(FETCHED_FLINK_VERSION, FETCHED_BEAM_VERSION)
    assert Path(jar).exists(), f"no Flink job server at {jar}: run scripts/fetch_flink.sh"
    return record_line(tmp_path_factory.mktemp("recording") / "line.avro")


def test_file_mode_on_flink_scores_byte_identical_to_the_in_process_runner(recording, tmp_path):
    direct = score_files(recording, tmp_path / "direct")
    flink = score_files(recording, tmp_path / "flink", *FLINK)
    assert_identical(file_scores(direct), file_scores(flink))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    """FLEET_EVENTS events of 20 machines: several of each device's events to a batch of 1,000."""
    path = tmp_path_factory.mktemp("fleet") / "fleet.avro"
    write_events(path, (e for e, _ in LineSimulator(SimulatorConfig(devices=20, seed=7)).take(FLEET_EVENTS)))
    return path


def test_file_mode_on_flink_keeps_each_devices_order_in_batch(fleet, tmp_path):
    """Flink's batch grouping reorders a key's elements: without transforms/read_order.py, 1,413 of 6,000 matched."""
    direct = score_files(fleet, tmp_path / "direct")
    flink = score_files(fleet, tmp_path / "flink", *FLINK, "--parallelism", "2")
    assert_identical(file_scores(direct), file_scores(flink), FLEET_EVENTS)


@pytest.fixture(scope="module")
def bounded_kafka_run(recording, broker, tmp_path_factory):
    """One bounded Kafka job on the in-process runner and one on Flink, same input; Flink's failure if any."""
    from transforms.kafka_client import KafkaConfig

    config = KafkaConfig(broker.bootstrap_servers)
    topic = lambda kind: f"flink-bounded-{kind}"  # noqa: E731
    # One partition: its 1,200 records take two read calls (1,000 at most each, transforms/kafka_source.py), so
    # the batch stage resumes a deferred remainder. scripts/flink-job-server.patch once broke that (docs/flink.md).
    replay([recording], config, topic("in"), partitions=1)
    sensor_scoring.run([*kafka_job_args(config, topic, "direct"), "--bounded"])
    failure = None
    try:
        sensor_scoring.run([*kafka_job_args(config, topic, "flink"), "--bounded", *FLINK])
    except RuntimeError as e:
        failure = e
    return config, topic, failure


def test_bounded_kafka_job_on_flink_scores_every_event_like_the_in_process_runner(bounded_kafka_run):
    config, topic, _ = bounded_kafka_run
    assert_identical(kafka_scores(config, topic("direct-scores")), kafka_scores(config, topic("flink-scores")))


def test_bounded_kafka_job_on_flink_finishes_and_commits_the_end_offsets(bounded_kafka_run):
    """Flink batch has no bundle finalization: the job commits its end offsets once it has succeeded."""
    config, topic, failure = bounded_kafka_run
    assert failure is None, str(failure).splitlines()[0]
    assert all_committed(config, topic("in"), topic("flink-group"))


@pytest.mark.slow
def test_streaming_job_on_flink_scores_commits_closes_windows_and_reclaims_devices(recording, tmp_path, kafka_config,
                                                                                 topic_names):
    """Checkpoints every second: every event scored once like the in-process runner, offsets committed after
    checkpoints, every drift window closed with the bounded run's records and retrain triggers, every idle device
    reclaimed by its timer."""
    streaming_flags = ["--drift_window_s", "10", "--state_ttl_s", "20", "--retrain_after_windows", "1"]
    replay([recording], kafka_config, topic_names("in"), partitions=2)
    sensor_scoring.run([*kafka_job_args(kafka_config, topic_names, "direct"), "--bounded", *streaming_flags])
    expected_drift = drift_records(kafka_config, topic_names("direct-drift"))
    expected_triggers = retrain_triggers(kafka_config, topic_names("direct-retrain"))
    assert expected_triggers, "the recording should drift somewhere"
    port = free_port()
    job = JobProcess([*kafka_job_args(kafka_config, topic_names, "flink"), *FLINK, *streaming_flags,
                      "--checkpointing_interval", "1000", "--metrics_port", str(port),
                      "--status_interval_s", "0"], tmp_path / "job.log")
    try:
        job.wait_for(lambda: len(kafka_scores(kafka_config, topic_names("flink-scores"))) == EVENTS, 150,
                     "score for every event")
        job.wait_for(lambda: all_committed(kafka_config, topic_names("in"), topic_names("flink-group")), 60,
                     "commit of the end offsets")
        job.wait_for(lambda: len(drift_records(kafka_config, topic_names("flink-drift"))) == len(expected_drift),
                     90, "every drift window closed")
        job.wait_for(lambda: retrain_triggers(kafka_config, topic_names("flink-retrain")) == expected_triggers, 30,
                     "the bounded run's retrain triggers")
        job.wait_for(lambda: metric(port, "sensor_scoring_devices_expired_total") == 8, 90, "idle devices reclaimed")
        growth = checkpoint_growth(MiniClusterRest(tmp_path / "job.log"), over_s=20)
    finally:
        job.stop()
    assert_identical(kafka_scores(kafka_config, topic_names("direct-scores")),
                     kafka_scores(kafka_config, topic_names("flink-scores")))
    assert len(read_all(kafka_config, topic_names("flink-scores"))) == EVENTS, "an event scored twice"
    assert drift_records(kafka_config, topic_names("flink-drift")) == expected_drift
    # Unpatched, the 2.62 job server kept every idle poll's residual: 270 KB in 20 s (docs/flink.md).
    assert growth < 20_000, f"an idle job's checkpoints grew by {growth} bytes in 20 s"


def rest(address: str, path: str, body: dict | None = None, method: str = "GET") -> dict:
    """A call to a Flink REST API at `address` (host:port); its JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{address}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else {}


class MiniClusterRest:
    """The REST API of the MiniCluster a [local] job runs in, at the port its job server logs."""

    def __init__(self, job_log: Path):
        match = re.search(r"Rest endpoint listening at (localhost:\d+)", job_log.read_text())
        assert match, "the job server logged no REST endpoint"
        self.address = match.group(1)

    def latest_checkpoint(self) -> dict:
        [job] = rest(self.address, "/jobs/overview")["jobs"]
        return rest(self.address, f"/jobs/{job['jid']}/checkpoints")["latest"]["completed"]


def checkpoint_growth(rest: MiniClusterRest, over_s: float) -> int:
    """Bytes the job's checkpointed state grew by between two checkpoints `over_s` apart."""
    first = rest.latest_checkpoint()
    time.sleep(over_s)
    last = rest.latest_checkpoint()
    assert last["id"] > first["id"], "no checkpoint completed"
    return last["state_size"] - first["state_size"]


class Cluster:
    """deploy/start_flink_cluster.sh's cluster in a folder of its own: 2 TaskManagers with 2 slots each."""

    SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "start_flink_cluster.sh"

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = dict(os.environ, FLINK_CLUSTER_DIR=str(folder), REST_PORT=str(free_port()), TASKMANAGERS="2")
        self.master = f"localhost:{self.env['REST_PORT']}"

    def script(self, command: str) -> None:
        subprocess.run([str(self.SCRIPT), command], env=self.env, check=True, timeout=300)

    def rest(self, path: str, body: dict | None = None, method: str = "GET") -> dict:
        return rest(self.master, path, body, method)

    def running_job(self) -> str:
        return next(j["jid"] for j in self.rest("/jobs/overview")["jobs"] if j["state"] == "RUNNING")

    def cancel_all(self) -> None:
        for j in self.rest("/jobs/overview")["jobs"]:
            if j["state"] not in ("FINISHED", "CANCELED", "FAILED"):
                self.rest(f"/jobs/{j['jid']}?mode=cancel", method="PATCH")

    def taskmanager_pids(self) -> list[int]:
        pids = []
        for pid_file in self.folder.glob("flink-*-taskexecutor.pid"):
            pids += [int(line) for line in pid_file.read_text().split()]
        return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory) -> Iterator[Cluster]:
    """Started once for the module; stopped after, pass or fail."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.script("start")
        yield cluster
    finally:
        subprocess.run([str(Cluster.SCRIPT), "stop"], env=cluster.env, timeout=120)


def launch(cluster: Cluster, config, topic, log: Path, metrics_port: int = 0, **env: str) -> subprocess.Popen:
    """deploy/launch_flink.sh, the streaming job, parallelism 2, checkpoints every 5 s, LOOPBACK workers.

    The workers run in the launcher, so its metrics port (when given) serves theirs.
    """
    args = kafka_job_args(config, topic, "flink") + ["--status_interval_s", "0"]
    if metrics_port:
        args += ["--metrics_port", str(metrics_port)]
    return subprocess.Popen([str(Cluster.SCRIPT.parent / "launch_flink.sh"), *args[2:]],
                            env=dict(cluster.env, FLINK_MASTER=cluster.master, KAFKA=config.bootstrap_servers,
                                     PARALLELISM="2", CHECKPOINT_MS=CHECKPOINT_MS, ENVIRONMENT_TYPE="LOOPBACK", **env),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_launcher(launcher: subprocess.Popen) -> None:
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()


def produce_as_read(config, topic: str, records) -> None:
    """The records again, each to its own partition with its own key and timestamp, acknowledged."""
    producer = KafkaProducer(**config.client_kwargs(), acks="all")
    for r in records:
        producer.send(topic, key=r.key, value=r.value, partition=r.partition, timestamp_ms=r.timestamp)
    producer.flush()
    producer.close()


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(2)
    raise AssertionError(f"no {what} within {timeout_s} s")


@pytest.mark.slow
def test_file_mode_on_a_standalone_cluster_with_parallelism_2_scores_like_the_in_process_runner(
        recording, tmp_path, standalone_cluster):
    direct = score_files(recording, tmp_path / "direct")
    flink = score_files(recording, tmp_path / "flink", "--runner", "FlinkRunner", "--flink_master",
                        standalone_cluster.master, "--environment_type", "LOOPBACK", "--parallelism", "2")
    assert_identical(file_scores(direct), file_scores(flink))


@pytest.mark.slow
def test_stop_with_a_savepoint_and_restart_from_it_keeps_device_state(recording, tmp_path, standalone_cluster,
                                                                      kafka_config, topic_names):
    """Half the stream, stop with a savepoint, the other half from it: the scores of one uninterrupted run.

    A device that had calibrated before the stop would calibrate again with its
    state lost, and its scores would differ from the uninterrupted run's. The
    second job must say it was restored from that savepoint.
    """
    replay([recording], kafka_config, topic_names("all"), partitions=2)
    sensor_scoring.run([*kafka_job_args(kafka_config, topic_names, "direct"), "--input_topic", topic_names("all"),
                        "--bounded"])
    records = sorted(read_topic(kafka_config, topic_names("all")), key=lambda r: (r.partition, r.offset))
    ends = {p: sum(1 for r in records if r.partition == p) for p in (0, 1)}
    first = [r for r in records if r.offset < ends[r.partition] // 2]
    second = [r for r in records if r.offset >= ends[r.partition] // 2]
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    produce_as_read(kafka_config, topic_names("in"), first)
    ports = (free_port(), free_port())
    launcher = launch(standalone_cluster, kafka_config, topic_names, tmp_path / "first.log", ports[0])
    device_counts: dict[str, float] = {}
    try:
        wait_until(lambda: sum(v or 0 for v in committed_offsets(
            kafka_config, topic_names("in"), topic_names("flink-group")).values()) == len(first), 180,
            "commit of the first half")
        job = standalone_cluster.running_job()
        device_counts["expired before the stop"] = metric(ports[0], "sensor_scoring_devices_expired_total")
        request = standalone_cluster.rest(f"/jobs/{job}/stop", {"drain": False}, method="POST")["request-id"]
        status: dict = {}
        wait_until(lambda: status.update(standalone_cluster.rest(f"/jobs/{job}/savepoints/{request}"))
                   or status["status"]["id"] == "COMPLETED", 60, "savepoint")
        savepoint = status["operation"]["location"]
        launcher.wait(60)
        produce_as_read(kafka_config, topic_names("in"), second)
        launcher = launch(standalone_cluster, kafka_config, topic_names, tmp_path / "second.log", ports[1],
                          SAVEPOINT=savepoint)
        wait_until(lambda: len(read_all(kafka_config, topic_names("flink-scores"))) >= EVENTS, 180, "every score")
        device_counts["expired after the restart"] = metric(ports[1], "sensor_scoring_devices_expired_total")
        device_counts["started after the restart"] = metric(ports[1], "sensor_scoring_devices_started_total")
        second_job = standalone_cluster.running_job()
        restored = standalone_cluster.rest(f"/jobs/{second_job}/checkpoints")["latest"]["restored"]
        assert restored and restored["is_savepoint"] and restored["external_path"] == savepoint, (restored, savepoint)
    finally:
        standalone_cluster.cancel_all()
        stop_launcher(launcher)
    # A device state started after the restart was not restored: before the job server's fused stages got
    # names of their own (scripts/flink-job-server.patch), 3 restarts of 5 started all 8 again.
    assert device_counts == {"expired before the stop": 0, "expired after the restart": 0,
                             "started after the restart": 0}, device_counts
    assert_identical(kafka_scores(kafka_config, topic_names("direct-scores")),
                     kafka_scores(kafka_config, topic_names("flink-scores")))
    assert len(read_all(kafka_config, topic_names("flink-scores"))) == EVENTS, "an event scored twice"


@pytest.mark.slow
def test_a_taskmanager_killed_mid_stream_loses_no_event(fleet, tmp_path, standalone_cluster, kafka_config, topic_names):
    """SIGKILL to a TaskManager after a checkpoint, half the stream in: Flink restores it; every event scored,
    and the group's offsets reach the end.

    The second half is sent after the kill, so the restored job has to read it. The restored job calls
    the finalizers of several bundles at once when a checkpoint completes: before commits of a run were
    serialised (transforms/offset_commits.GroupCommits), a lower offset landed last and stayed, 3 runs of 3.
    """
    replay([fleet], kafka_config, topic_names("all"), partitions=4)
    records = sorted(read_topic(kafka_config, topic_names("all")), key=lambda r: (r.partition, r.offset))
    ends = {p: sum(1 for r in records if r.partition == p) for p in range(4)}
    ensure_topics(kafka_config, [topic_names("in")], partitions=4)
    produce_as_read(kafka_config, topic_names("in"), [r for r in records if r.offset < ends[r.partition] // 2])
    launcher = launch(standalone_cluster, kafka_config, topic_names, tmp_path / "job.log")
    try:
        wait_until(lambda: len(read_all(kafka_config, topic_names("flink-scores"))) > 0, 180, "first scores")
        job = standalone_cluster.running_job()
        wait_until(lambda: standalone_cluster.rest(f"/jobs/{job}/checkpoints")["counts"]["completed"] > 0, 60,
                   "checkpoint")
        os.kill(standalone_cluster.taskmanager_pids()[0], signal.SIGKILL)
        standalone_cluster.script("add-taskmanager")
        produce_as_read(kafka_config, topic_names("in"), [r for r in records if r.offset >= ends[r.partition] // 2])
        wait_until(lambda: len(kafka_scores(kafka_config, topic_names("flink-scores"))) == FLEET_EVENTS, 300,
                   "score for every event after the restore")
        wait_until(lambda: committed_offsets(kafka_config, topic_names("in"), topic_names("flink-group")) == ends,
                   120, f"commit of every partition's end offset {ends}")
        job = standalone_cluster.running_job()
        restored = standalone_cluster.rest(f"/jobs/{job}/checkpoints")["latest"]["restored"]
        assert restored and not restored["is_savepoint"], restored
    finally:
        standalone_cluster.cancel_all()
        stop_launcher(launcher)
