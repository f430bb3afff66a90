"""A dependency-free progress line for long command-line work (record, replay).

On a terminal it redraws one line in place; elsewhere (logs, CI) it prints a
plain line every few seconds, so a log is not flooded with carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_BAR_WIDTH = 30


class Progress:
    """Counts work done and shows count, rate and, when the total is known, a bar and ETA."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 min_interval_s: float | None = None):
        self._label = label
        self._total = total
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = min_interval_s if min_interval_s is not None else (0.2 if self._tty else 5.0)
        self._started = self._last = time.monotonic()
        self.count = 0

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._show(now, final=False)

    def close(self) -> None:
        """Shows the final line, with the total count, time and rate."""
        self._show(time.monotonic(), final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _show(self, now: float, final: bool) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.count / elapsed
        text = f"{self._label}: {self.count}"
        if self._total:
            done = min(self.count / self._total, 1.0)
            bar = "#" * int(done * _BAR_WIDTH)
            text = f"{self._label} [{bar:<{_BAR_WIDTH}}] {self.count}/{self._total} {done:4.0%}"
            if not final and rate > 0:
                text += f" eta {(self._total - self.count) / rate:.0f}s"
        text += f" | {rate:,.0f}/s | {elapsed:.1f}s"
        if self._tty:
            self._stream.write("\r" + text + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
