"""Starting and stopping local broker processes so that none outlives its owner.

Both local brokers (Tansu in ``embedded_broker``, Apache Kafka in
``kafka_cluster``) are child processes of a test session, a benchmark or
``run_local.sh``. A broker left running holds ports, memory (a JVM: hundreds
of MiB) and, for Kafka, a data folder, so every one started here is stopped
three ways: by its owner's ``stop()`` (context managers, fixtures with
``finally``), by an ``atexit`` hook when the interpreter exits normally, and
by the kernel (``PR_SET_PDEATHSIG``: SIGKILL when the process that started it
dies, even by SIGKILL), set by util-linux's ``setpriv`` before it execs the
broker (a ``preexec_fn`` would run Python in the forked child, which is not
safe while kafka-python's threads run). Each broker runs in its own process
group, so a Ctrl-C in the terminal reaches the owner, which then stops the
broker in order, and not the broker directly.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from typing import IO, Optional, Sequence

_RUNNING: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _dies_with_parent(command: Sequence[str]) -> list[str]:
    """`command`, killed by the kernel when this process dies, where setpriv exists (Linux); else unchanged."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "SIGKILL", "--", *command] if setpriv else list(command)


def start_owned(command: Sequence[str], log: Optional[Path] = None, cwd: Optional[Path] = None) -> subprocess.Popen:
    """Starts `command` in its own process group, tied to this process; output to `log` (appended) or nowhere.

    The kernel's parent-death signal follows the thread that started the
    child: start brokers from a thread that lives as long as they should.
    """
    out: IO | int = open(log, "ab") if log else subprocess.DEVNULL
    try:
        process = subprocess.Popen(_dies_with_parent(command), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    finally:
        if log:
            out.close()  # the child has its own copy
    _RUNNING.add(process)
    return process


def stop_processes(processes: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM to each, then SIGKILL to any still running after `grace_s`; waits for all of them."""
    for process in processes:
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
                process.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _RUNNING.discard(process)


@atexit.register
def _stop_leftovers() -> None:
    """The interpreter is exiting with brokers still running: an owner forgot, or was interrupted."""
    leftovers = [p for p in _RUNNING if p.poll() is None]
    for process in leftovers:
        process.kill()
    for process in leftovers:
        process.wait()
