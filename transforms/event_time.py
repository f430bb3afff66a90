"""The job's one clock: each event's own ``event_time``, and the watermark policy per partition.

Kafka's record timestamp may be anything: the producer's send time (the
default of most clients, Kafka Connect and gateways that forward buffered
readings), the broker's append time, or the event time. The job never reads
it. Element timestamps, the source watermark, device expiry, drift windows
and lateness all come from ``event_time`` in the payload, as Beam's KafkaIO
does with a ``CustomTimestampPolicyWithLimitedDelay`` and Flink with a
``WatermarkStrategy`` and a timestamp assigner.

The policy, per partition (:class:`PartitionClock`):

* watermark = the newest event time read from the partition so far minus
  ``max_out_of_orderness`` (``--max_out_of_orderness_s``). It never goes back.
* A record whose event time cannot be read (it will be a dead letter) or is
  implausible (before 2000, or further in the future than validation allows)
  leaves the watermark where it is: one corrupt timestamp must not jump it.
* Idle partitions: once the reader has been caught up and found nothing for
  ``idle_after`` of wall-clock time (``--partition_idle_s``), the watermark
  moves on at the wall clock's rate from where the data left it, so a silent
  partition does not hold windows open for ever: it delays them by at most
  ``idle_after`` plus the out-of-orderness. At the recorded pace or faster the
  data is always ahead of that, so a replay at any ``--speed`` from 1 up (and
  0, as fast as possible) reads every record with the watermark a live run
  reads it with: lateness, drift windows and expiry are the same. A replay
  slower than the recorded pace can make late an event that was on time live:
  one that follows a silence of G event-seconds in its partition, at speed
  s < 1, when G (1/s - 1) exceeds idle_after + out-of-orderness + allowed
  lateness (at half speed, with the defaults: a silence over 15 s).
* An event is *late* when its event time is behind its partition's watermark,
  as read with it, by more than ``allowed_lateness`` (``--allowed_lateness_s``).
  It is still scored, in its device's order; it is counted, and drift leaves
  it out (a window closes for good once every partition's watermark has
  passed its end plus the allowed lateness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

EARLIEST_EVENT_MS = 946_684_800_000  # 2000-01-01: older timestamps are clock or unit errors


@dataclass(frozen=True)
class WatermarkPolicy:
    """How far a partition's watermark trails its newest event, and how far behind it an event may still count."""

    max_out_of_orderness_ms: int = 5_000
    allowed_lateness_ms: int = 0
    idle_after_ms: int = 10_000
    max_future_ms: int = 3_600_000  # as decode's ValidationRules.max_future_s: such events are rejected

    @classmethod
    def from_seconds(cls, max_out_of_orderness_s: float, allowed_lateness_s: float,
                     partition_idle_s: float) -> WatermarkPolicy:
        if min(max_out_of_orderness_s, allowed_lateness_s, partition_idle_s) < 0:
            raise ValueError("--max_out_of_orderness_s, --allowed_lateness_s and --partition_idle_s "
                             "must not be negative")
        return cls(int(max_out_of_orderness_s * 1000), int(allowed_lateness_s * 1000), int(partition_idle_s * 1000))

    def plausible(self, event_time_ms: int, now_ms: int) -> bool:
        """Whether the time may move a watermark: validation rejects the others anyway."""
        return EARLIEST_EVENT_MS <= event_time_ms <= now_ms + self.max_future_ms

    def is_late(self, event_time_ms: int, watermark_ms: Optional[int]) -> bool:
        """Behind the watermark it was read with by more than the allowed lateness."""
        return watermark_ms is not None and event_time_ms < watermark_ms - self.allowed_lateness_ms


class PartitionClock:
    """One partition's watermark under a :class:`WatermarkPolicy`; its state survives checkpoints.

    Idle time is measured on the wall clock from the last record read, not
    summed over polls: a runner may resume a caught-up reader seconds later
    than it asked (Prism does).
    """

    __slots__ = ("policy", "newest_ms", "watermark_ms", "last_read_ms")

    def __init__(self, policy: WatermarkPolicy, newest_ms: Optional[int] = None,
                 watermark_ms: Optional[int] = None, last_read_ms: Optional[int] = None):
        self.policy = policy
        self.newest_ms = newest_ms
        self.watermark_ms = watermark_ms
        self.last_read_ms = last_read_ms  # wall-clock time the last record was read

    def state(self) -> tuple[Optional[int], Optional[int], Optional[int]]:
        return self.newest_ms, self.watermark_ms, self.last_read_ms

    def observe(self, event_time_ms: Optional[int], now_ms: int) -> Optional[int]:
        """Takes in a record's event time (None: unreadable), read at wall time `now_ms`; returns its watermark."""
        self.last_read_ms = now_ms
        if event_time_ms is not None and self.policy.plausible(event_time_ms, now_ms):
            if self.newest_ms is None or event_time_ms > self.newest_ms:
                self.newest_ms = event_time_ms
                self._advance(event_time_ms - self.policy.max_out_of_orderness_ms)
        return self.watermark_ms

    def idle(self, now_ms: int) -> None:
        """The reader is caught up and found nothing at wall time `now_ms`: past the grace, event time moves on.

        The watermark then is where the last record left it plus the silence beyond the grace.
        """
        if self.newest_ms is None or self.last_read_ms is None:
            return  # nothing read yet: no event time to move on from
        beyond_grace = now_ms - self.last_read_ms - self.policy.idle_after_ms
        if beyond_grace > 0:
            self._advance(self.newest_ms - self.policy.max_out_of_orderness_ms + beyond_grace)

    def _advance(self, watermark_ms: int) -> None:
        if self.watermark_ms is None or watermark_ms > self.watermark_ms:
            self.watermark_ms = watermark_ms
