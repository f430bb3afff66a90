"""``--local_processes N``: the job as N scoring processes on disjoint input partitions, plus a drift merger.

Why: Beam's in-process runner fuses the whole job into one stage and runs
it on one thread, and its multi-worker mode sends every element and state
access over gRPC to one worker (docs/performance.md), so one job uses one
core. Scoring is keyed by device and a device's events are on one input
partition (producers key by device), so the partitions can be split between
processes as a consumer group with manual assignment would split them: each
process is the ordinary job with ``--input_partitions``, keeps the state of
its own devices only, writes its scores and commits its own partitions'
offsets. Nothing about a score changes.

Drift statistics are fleet-wide, so the scoring processes write their
partial summaries to ``--drift_partials_topic`` (default
``DRIFT_TOPIC-partials``) and one more process, ``beam_jobs.drift_merge``,
closes the windows: the drift and retrain topics get what a single process
writes. Streaming, the merger runs alongside; ``--bounded``, it runs once
the scoring processes have finished.

Supervision: process i logs with the label ``scoring-i`` and serves
``--metrics_port + i``. SIGINT/SIGTERM is passed on to the scoring
processes, which drain; the merger is stopped after them. If any process
fails, the others are stopped and the launcher exits with its exit code. If
the launcher itself is killed (SIGKILL), every child gets SIGTERM (Linux's
parent-death signal) and drains, rather than running on unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Callable, Optional

import torch

from beam_jobs.drift_merge import merge_group
from beam_jobs.heap import long_lived_objects_frozen
from beam_jobs.options import SensorScoringOptions, kafka_config
from beam_jobs.pipelines import runs_in_process
from models.drift_reference import load_reference
from transforms.kafka_client import PartitionDescriptor, commit_end_offsets, ensure_topics

_LOG = logging.getLogger("local_processes")
PROCESS_LABEL_ENV = "SENSOR_SCORING_PROCESS"
_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1


def _drain_when_parent_dies() -> None:
    """Linux: a child gets SIGTERM (and drains) if the launcher is killed, instead of running on unsupervised."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalProcessesError(ValueError):
    """--local_processes asked for where it cannot work."""


def check_runner(runner: Optional[str]) -> None:
    """Only the DirectRunner: on Flink each process would submit a whole job; Flink's --parallelism splits there."""
    if not runs_in_process(runner):
        raise LocalProcessesError(f"--local_processes is for the DirectRunner, not {runner}: "
                                  "leave it at 1 and set --parallelism")


def split_partitions(partitions: list[PartitionDescriptor], processes: int) -> list[list[PartitionDescriptor]]:
    """Round-robin: process i reads partitions i, i + n, ...; never more processes than partitions."""
    n = max(1, min(processes, len(partitions)))
    return [partitions[i::n] for i in range(n)]


class LocalProcesses:
    """Starts, watches and stops the processes of one ``--local_processes`` job.

    The children are forked from the launcher, which has imported the job
    already, so each starts without importing torch and Beam again (2.3 s on
    the development machine, 3.3-5.4 s for two processes importing at once;
    the job's start-up counts in the throughput benchmark). Fork is safe here because the launcher has run no
    torch operation (whose OpenMP thread pool does not survive a fork) and
    holds no open Kafka client or other thread when it forks.
    """

    def __init__(self, argv: list[str], opts: SensorScoringOptions, partitions: list[PartitionDescriptor], *,
                 scoring_main: Callable[[list[str]], None], merge_main: Callable[[list[str]], None]):
        self._argv = list(argv)
        self._opts = opts
        self._groups = split_partitions(partitions, opts.local_processes)
        self._scoring_main = scoring_main
        self._merge_main = merge_main
        self._scoring: list[multiprocessing.Process] = []
        self._merger: Optional[multiprocessing.Process] = None
        self._stopping = False

    def run(self) -> int:
        """Runs the job to its end (bounded) or until a signal; returns the exit code."""
        partials_topic = self._prepare_partials_topic()
        with long_lived_objects_frozen():  # before the forks: the children share these pages
            return self._run_processes(partials_topic)

    def _run_processes(self, partials_topic: Optional[str]) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for i, group in enumerate(self._groups):
            self._scoring.append(self._start_scoring(i, group, partials_topic))
        if partials_topic and not self._opts.bounded:
            self._merger = self._start_merger(partials_topic)
        code = self._wait_for_scoring()
        if code == 0 and partials_topic and self._opts.bounded:
            self._merger = self._start_merger(partials_topic)
        return self._finish_merger(code)

    def _prepare_partials_topic(self) -> Optional[str]:
        """The partials topic, created, with the merger's start set to its end; None when there is no drift."""
        if load_reference(self._opts.model_dir) is None:
            return None  # each scoring process says so in its log
        topic = self._opts.drift_partials_topic or f"{self._opts.drift_topic}-partials"
        config = kafka_config(self._opts)
        ensure_topics(config, [topic], partitions=self._opts.topic_partitions, timeout_s=self._opts.startup_timeout_s)
        commit_end_offsets(config, topic, merge_group(self._opts))
        return topic

    def _start_scoring(self, i: int, group: list[PartitionDescriptor],
                       partials_topic: Optional[str]) -> multiprocessing.Process:
        numbers = ",".join(str(p.partition) for p in group)
        port = self._opts.metrics_port + i if self._opts.metrics_port else 0
        extra = ["--local_processes", "1", "--input_partitions", numbers, "--metrics_port", str(port)]
        if partials_topic:
            extra += ["--drift_partials_topic", partials_topic]
        child = self._fork(self._scoring_main, extra, f"scoring-{i}")
        _LOG.info("scoring-%d (pid %d): partitions %s of %s%s", i, child.pid, numbers, self._opts.input_topic,
                  f", /metrics on port {port}" if port else "")
        return child

    def _start_merger(self, partials_topic: str) -> multiprocessing.Process:
        extra = ["--local_processes", "1", "--metrics_port", "0", "--drift_partials_topic", partials_topic]
        child = self._fork(self._merge_main, extra, "drift-merge")
        _LOG.info("drift-merge (pid %d): %s -> %s", child.pid, partials_topic, self._opts.drift_topic)
        return child

    def _fork(self, entry: Callable[[list[str]], None], extra: list[str], label: str) -> multiprocessing.Process:
        threads = max(1, (os.cpu_count() or 1) // len(self._groups))
        child = multiprocessing.get_context("fork").Process(
            target=_child, args=(entry, [*self._argv, *extra], label, threads), name=label)
        child.start()
        return child

    def _on_signal(self, signum, frame) -> None:
        first = not self._stopping
        self._stopping = True
        running = [child for child in self._scoring if child.is_alive()]
        if not running and self._merger is not None:
            running = [self._merger]  # a bounded job's merger: the scoring processes are done
        _LOG.info("%s: passing it on to %d process(es)%s", signal.Signals(signum).name, len(running),
                  "" if first else " (again: they stop at once)")
        for child in running:
            os.kill(child.pid, signum)

    def _wait_for_scoring(self) -> int:
        """Waits for every scoring process; the first failure stops the others and is the result."""
        while True:
            codes = [child.exitcode for child in self._scoring]
            failed = next((c for c in codes if c), None)
            if failed is not None:
                _LOG.error("a scoring process exited with %d: stopping the others", failed)
                self._stop(self._scoring)
                return failed
            if all(c == 0 for c in codes):
                return 0
            time.sleep(_POLL_S)

    def _finish_merger(self, code: int) -> int:
        if self._merger is None:
            return code
        if not self._opts.bounded:
            self._stop([self._merger])  # the scoring processes have written their last partials
        self._merger.join()
        if self._merger.exitcode:
            _LOG.error("the drift merger exited with %d", self._merger.exitcode)
        return code or self._merger.exitcode

    @staticmethod
    def _stop(children: list[multiprocessing.Process], grace_s: float = 60.0) -> None:
        """SIGTERM (a drain), then SIGKILL for what is still running after `grace_s`."""
        for child in children:
            if child.is_alive():
                child.terminate()
        deadline = time.monotonic() + grace_s
        for child in children:
            child.join(timeout=max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join()


def _child(entry: Callable[[list[str]], None], argv: list[str], label: str, torch_threads: int) -> None:
    """A forked process: its own session (a terminal's Ctrl-C reaches the launcher only, which passes it on in
    order), SIGTERM if the launcher dies, its log label, default signal handling until the job sets its own,
    and its share of the cores for torch's intra-op threads (N processes each with a pool as large as the
    machine oversubscribe it)."""
    os.setsid()
    torch.set_num_threads(torch_threads)
    _drain_when_parent_dies()
    os.environ[PROCESS_LABEL_ENV] = label
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    entry(argv)
