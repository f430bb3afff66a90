"""When an idle device's state may go, and how it goes on a runner that fires timers early.

A device's state may be cleared once the source watermark carried by its
partition's records has passed its expiry (last event + TTL): every later
on-time event of the device would reset the state anyway, so clearing cannot
change a score. That evidence travels with the records (``ValidEvent.
watermark_ms``) and is kept here per partition, per job and worker process.

The device's event-time timer is the normal way to get there. The in-process
FnApiRunner, though, fires every timer of an unbounded source in its next
round, whatever the timer's time, long before the evidence can be there.
Re-arming would poll every idle device once per round, and giving up would
leave it in memory for good. Such a device is *parked* instead: put on its
partition's wait list, ordered by expiry, with no timer. The first record of
that partition whose evidence passes the expiry sends an :class:`ExpiryCheck`
down the device's key, upstream of the device state, and the device DoFn
clears the state then, or parks it again at its new expiry if it has had
events since. One check per device and TTL, whatever the number of rounds.

Wait lists live in the worker process, like the evidence. On the DirectRunner
the whole job is one fused stage in one process, so parking and waking meet.
A runner that fires timers on time (Flink) parks only devices whose partition
evidence lagged the watermark through all their timer back-off; those are
woken only if the wake-up step runs in the same process, else at the device's
next event.
"""

from __future__ import annotations

import heapq
import threading
from typing import Any, Iterator, NamedTuple

import apache_beam as beam

from transforms.decode import DeviceEvents
from transforms.offset_commits import partition_key


class ExpiryCheck(NamedTuple):
    """Sent down a parked device's key: its partition's evidence passed the expiry it was parked at."""

    parked_expiry_ms: int


class ExpiryEvidence:
    """Per job and worker process: the newest source watermark per partition, and the parked devices."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watermarks: dict[str, int] = {}
        self._parked: dict[str, list[tuple[int, str]]] = {}

    def observe(self, partition: str, watermark_ms: int) -> None:
        if watermark_ms <= self._watermarks.get(partition, -1):
            return  # the common case, once per event: no lock (watermarks only grow)
        with self._lock:
            if watermark_ms > self._watermarks.get(partition, -1):
                self._watermarks[partition] = watermark_ms

    def watermark(self, partition: str) -> int:
        return self._watermarks.get(partition, -1)

    def newest_watermark(self) -> int:
        """The furthest any partition's records have carried the watermark in this process."""
        with self._lock:
            return max(self._watermarks.values(), default=-1)

    def park(self, partition: str, expires_at_ms: int, device_id: str) -> None:
        with self._lock:
            heapq.heappush(self._parked.setdefault(partition, []), (expires_at_ms, device_id))

    def due(self, partition: str, evidence_ms: int) -> list[tuple[int, str]]:
        """Pops the (expiry, device_id) of the partition's parked devices that `evidence_ms` has passed."""
        # The common case, once per event, takes no lock: a racing park is seen at the next record.
        try:
            if self._parked[partition][0][0] > evidence_ms:
                return []
        except (KeyError, IndexError):  # nothing parked for the partition (or another thread emptied it)
            return []
        with self._lock:
            waiting = self._parked.get(partition)
            due = []
            while waiting and waiting[0][0] <= evidence_ms:
                due.append(heapq.heappop(waiting))
            return due


_EVIDENCE: dict[str, ExpiryEvidence] = {}


def evidence_for(job_token: str) -> ExpiryEvidence:
    """The job's evidence in this worker process, shared by every DoFn instance of the job here."""
    return _EVIDENCE.setdefault(job_token, ExpiryEvidence())


class WakeParkedDevicesFn(beam.DoFn):
    """Passes the keyed stream through, adding an ExpiryCheck for each parked device that is due.

    It tracks the evidence it has seen on its own: the device DoFn decides
    with the evidence of the records it has processed itself, and a runner
    may run this step ahead of it over a whole bundle. A check follows the
    device's events that made it due, so a runner that passes elements on one
    at a time (the fused in-process stage) lets the device DoFn see their
    evidence first; a check that still finds the evidence short parks the
    device again, for the next events to wake.
    """

    def __init__(self, job_token: str):
        self._job_token = job_token
        self._woken = beam.metrics.Metrics.counter("device_state", "parked_devices_woken")

    def setup(self) -> None:
        self._evidence = evidence_for(self._job_token)
        self._watermarks: dict[str, int] = {}

    def process(self, element: tuple[str, Any]) -> Iterator[tuple[str, Any]]:
        yield element
        _, device_events = element
        if not isinstance(device_events, DeviceEvents):
            return
        for partition in self._observe(device_events):
            for expires_at_ms, device_id in self._evidence.due(partition, self._watermarks[partition]):
                self._woken.inc()
                yield device_id, ExpiryCheck(expires_at_ms)

    def _observe(self, device_events: DeviceEvents) -> set[str]:
        """Takes in the events' source watermarks; the partitions they came from."""
        partitions = set()
        for event in device_events.events:
            partition = partition_key(event.source.topic, event.source.partition)
            self._watermarks[partition] = max(event.watermark_ms, self._watermarks.get(partition, -1))
            partitions.add(partition)
        return partitions
