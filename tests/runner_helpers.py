"""What the Flink and Prism tests share: runs of the job to compare, and no runner process left behind.

Scores are compared byte for byte (``processed_at`` aside): file mode against
file mode on the in-process runner, a Kafka run against a Kafka run (Kafka
scores carry the record's partition and offset, file scores the file's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from apache_beam.runners.portability.prism_runner import PrismRunner
from apache_beam.utils import shared
from apache_beam.utils.subprocess_server import SubprocessServer

from beam_jobs import sensor_scoring
from beam_jobs.compare import Comparison, compare_scores, scores_by_event, summary
from beam_jobs.recordings import write_events
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from schemas.serde import SCORE, AvroDecoder
from tests.kafka_helpers import committed_offsets, read_all
from transforms.kafka_client import KafkaConfig

EVENTS = 1200
JOB_FLAGS = ("--calibration_events", "30")


def record_line(path: Path) -> Path:
    """1,200 events of 8 simulated machines, the recording test_portable.py scores too."""
    write_events(path, (event for event, _ in LineSimulator(SimulatorConfig(devices=8, seed=5)).take(EVENTS)))
    return path


def score_files(recording: Path, output_dir: Path, *runner: str) -> Path:
    """File mode on `runner` (the in-process runner when empty); the scores file."""
    sensor_scoring.run(["--input_files", str(recording), "--output_dir", str(output_dir), *JOB_FLAGS, *runner])
    return output_dir / "scores-00000-of-00001.avro"


def kafka_job_args(config: KafkaConfig, topic: Callable[[str], str], name: str) -> list[str]:
    """The job's Kafka flags: input `topic('in')`, outputs and consumer group of their own for run `name`."""
    return ["--bootstrap_servers", config.bootstrap_servers, "--input_topic", topic("in"),
            "--score_topic", topic(f"{name}-scores"), "--dead_letter_topic", topic(f"{name}-dead"),
            "--drift_topic", topic(f"{name}-drift"), "--retrain_topic", topic(f"{name}-retrain"),
            "--consumer_group", topic(f"{name}-group"), *JOB_FLAGS]


def kafka_scores(config: KafkaConfig, topic: str) -> dict[str, dict]:
    return {s["event_id"]: s for *_, s in read_all(config, topic, AvroDecoder(SCORE))}


def assert_identical(expected: dict[str, dict], got: dict[str, dict], events: int = EVENTS) -> Comparison:
    """Every event scored once, each score equal to the expected one in every field but processed_at."""
    result = compare_scores(expected, got)
    assert result.compared == events and not result.missing and not result.extra, summary(result, 0.0)
    assert result.identical == events, summary(result, 0.0)
    return result


def file_scores(path: Path) -> dict[str, dict]:
    return scores_by_event(path)[0]


def all_committed(config: KafkaConfig, topic: str, group: str) -> bool:
    """True when the group's offsets add up to every record of `topic` (the end offsets)."""
    return sum(offset or 0 for offset in committed_offsets(config, topic, group).values()) == EVENTS


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def no_runner_left_behind() -> Iterator[None]:
    """After the test, pass or fail: stops any job server JVM or Prism this process started and Beam left running.

    Beam stops them only when the process exits (one JVM, about 500 MiB, per
    Flink run) and keeps them for reuse: a process-wide subprocess cache and
    PrismRunner's one shared server. Each is removed through Beam, which stops
    the process, and Prism's handle is replaced, so that the next test starts a
    fresh server instead of reaching a dead port; what is left is killed.
    """
    yield
    cache = SubprocessServer._cache
    for key in list(cache._cache):
        cache.force_remove(*key)
    PrismRunner.shared_handle = shared.Shared()
    for pid in _children(os.getpid()):
        cmd = _cmdline(pid)
        if "job-server" in cmd or "/prism" in cmd:
            os.kill(pid, signal.SIGKILL)


class JobProcess:
    """The job as a command in its own process group, stopped with the group (its JVM or Prism too)."""

    def __init__(self, args: list[str], log: Path):
        self._log = open(log, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "beam_jobs.sensor_scoring", *args],
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Seconds from start until `condition` holds; fails if the job exits or time runs out first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return time.monotonic() - self.started
            assert self.process.poll() is None, f"the job exited ({self.process.returncode}) before {what}"
            time.sleep(1.0)
        raise AssertionError(f"no {what} within {timeout_s} s")

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM to the job (it drains), then SIGKILL to its group after `grace_s`; the job's exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        self.process.wait()
        self._log.close()
        return self.process.returncode
