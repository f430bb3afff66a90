"""Live figures of the running job, shared in-process between the DoFns and the monitor thread.

The in-process runner reports Beam metrics only when a job ends, so the
source, the scoring step and the sink also update this process-wide registry,
which ``beam_jobs.monitor`` reads every few seconds. It holds the read time of
each polled batch per partition (to turn a written message's source offset
into its read -> written latency), each partition's high watermark and the
end of its written prefix (for lag), and running counts. Memory is bounded.
On a runner with separate worker processes (Flink) the registry stays empty
in the launching process: the Beam metrics are the figures there.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import Iterable, Optional

from transforms.offset_commits import SourcePosition, partition_key

MAX_BATCHES_PER_PARTITION = 4096
MAX_LATENCIES = 20_000


def now_ms() -> int:
    return int(time.time() * 1000)


class LiveStats:
    """Thread-safe counters and bounded recent history; ``snapshot()`` is what the monitor reads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._batch_offsets: dict[str, list[int]] = {}
        self._batch_read_ms: dict[str, list[int]] = {}
        self._highwater: dict[str, int] = {}
        self._written_to: dict[str, int] = {}
        self._latencies: deque[int] = deque(maxlen=MAX_LATENCIES)
        self._counts = {"events_read": 0, "scores": 0, "dead_letters": 0, "anomalies": 0,
                        "devices_started": 0, "devices_expired": 0, "late_events": 0}

    def batch_read(self, key: str, first_offset: int, count: int, highwater: Optional[int]) -> None:
        """The source polled `count` records of partition `key` from `first_offset` on, now."""
        with self._lock:
            offsets = self._batch_offsets.setdefault(key, [])
            read_ms = self._batch_read_ms.setdefault(key, [])
            offsets.append(first_offset)
            read_ms.append(now_ms())
            if len(offsets) > MAX_BATCHES_PER_PARTITION:
                del offsets[: len(offsets) // 2], read_ms[: len(read_ms) // 2]
            self._written_to.setdefault(key, first_offset)
            if highwater is not None:
                self._highwater[key] = highwater
            self._counts["events_read"] += count

    def written(self, stream: str, sources: Iterable[Optional[SourcePosition]]) -> list[int]:
        """Messages of `stream` are on the broker; returns their read -> written latencies in ms."""
        written_ms = now_ms()
        latencies = []
        with self._lock:
            for source in sources:
                self._counts[stream] = self._counts.get(stream, 0) + 1
                if source is None:
                    continue
                key = partition_key(source.topic, source.partition)
                self._written_to[key] = max(self._written_to.get(key, 0), source.offset + 1)
                read_ms = self._read_ms(key, source.offset)
                if read_ms is not None:
                    latencies.append(written_ms - read_ms)
            self._latencies.extend(latencies)
        return latencies

    def scored(self, is_anomaly: bool) -> None:
        if is_anomaly:
            with self._lock:
                self._counts["anomalies"] += 1

    def add(self, name: str, n: int = 1) -> None:
        """Adds to a running count, such as ``devices_started`` or ``devices_expired``."""
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def _read_ms(self, key: str, offset: int) -> Optional[int]:
        offsets = self._batch_offsets.get(key)
        i = bisect.bisect_right(offsets, offset) - 1 if offsets else -1
        return self._batch_read_ms[key][i] if i >= 0 else None

    def snapshot(self) -> dict:
        """Counts, recent latencies and per-partition lag (high watermark - end of the written prefix)."""
        with self._lock:
            lag = {key: max(0, hw - self._written_to.get(key, 0)) for key, hw in sorted(self._highwater.items())}
            return {"at": time.monotonic(), **self._counts, "latencies_ms": list(self._latencies), "lag": lag}


LIVE = LiveStats()
