"""The watermark policy as plain logic: event time from the payload, per partition, idle partitions, lateness."""

from __future__ import annotations

import pytest

from transforms.event_time import EARLIEST_EVENT_MS, PartitionClock, WatermarkPolicy

T0 = 1_750_000_000_000
NOW = T0 + 30 * 86_400_000  # the data is 30 days old
POLICY = WatermarkPolicy(max_out_of_orderness_ms=5_000, allowed_lateness_ms=2_000, idle_after_ms=10_000)


def test_the_watermark_trails_the_newest_event_time_and_never_goes_back():
    clock = PartitionClock(POLICY)
    assert clock.observe(None, NOW) is None  # nothing readable yet: no watermark
    assert clock.observe(T0 + 10_000, NOW) == T0 + 5_000
    assert clock.observe(T0 + 4_000, NOW) == T0 + 5_000  # out of order: read with the same watermark
    assert clock.observe(T0 + 12_000, NOW) == T0 + 7_000
    assert clock.observe(None, NOW) == T0 + 7_000


def test_implausible_times_do_not_move_the_watermark():
    clock = PartitionClock(POLICY)
    clock.observe(T0, NOW)
    assert clock.observe(NOW + POLICY.max_future_ms + 1, NOW) == T0 - 5_000  # a corrupt clock far ahead
    assert clock.observe(EARLIEST_EVENT_MS - 1, NOW) == T0 - 5_000


def test_lateness_is_measured_from_the_watermark_the_event_was_read_with():
    clock = PartitionClock(POLICY)
    clock.observe(T0 + 20_000, NOW)  # watermark T0 + 15 s
    assert not POLICY.is_late(T0 + 13_000, clock.observe(T0 + 13_000, NOW))
    assert POLICY.is_late(T0 + 12_999, clock.observe(T0 + 12_999, NOW))
    assert not POLICY.is_late(T0, None)


def test_an_idle_partition_moves_on_with_the_wall_clock_after_the_grace_only():
    clock = PartitionClock(POLICY)
    clock.idle(NOW)  # nothing read yet: nothing to move on from
    assert clock.watermark_ms is None
    clock.observe(T0, NOW)
    clock.idle(NOW + 8_000)  # 8 s silent: within the grace
    assert clock.watermark_ms == T0 - 5_000
    clock.idle(NOW + 12_000)  # 12 s silent, however many polls: 2 s past the grace
    assert clock.watermark_ms == T0 - 3_000
    # A record ends the silence: the next silence has its own grace.
    assert clock.observe(T0 + 1_000, NOW + 13_000) == T0 - 3_000
    clock.idle(NOW + 22_000)
    assert clock.watermark_ms == T0 - 3_000
    clock.idle(NOW + 25_000)
    assert clock.watermark_ms == T0 + 1_000 - 5_000 + 2_000


def test_a_replay_at_the_recorded_pace_reads_each_record_with_the_watermark_of_a_fast_replay():
    """Events one second apart with a 40 s gap, read as they come (idle in between) and all at once."""
    times = [T0 + i * 1_000 for i in range(20)] + [T0 + 60_000 + i * 1_000 for i in range(20)]
    fast, paced = PartitionClock(POLICY), PartitionClock(POLICY)
    fast_marks = [fast.observe(t, NOW) for t in times]
    paced_marks = []
    for t in times:
        wall = NOW + (t - T0)  # a replay at --speed 1: each record read as its time comes round
        paced.idle(wall - 1)  # polled and found nothing just before it
        paced_marks.append(paced.observe(t, wall))
    assert [POLICY.is_late(t, w) for t, w in zip(times, paced_marks)] == [False] * len(times)
    assert paced_marks[:20] == fast_marks[:20]
    assert all(p >= f for p, f in zip(paced_marks, fast_marks))  # the gap let the paced watermark move on


def test_the_clock_state_round_trips_through_a_checkpoint():
    clock = PartitionClock(POLICY)
    clock.observe(T0, NOW)
    restored = PartitionClock(POLICY, *clock.state())
    restored.idle(NOW + 11_000)
    clock.idle(NOW + 11_000)
    assert restored.state() == clock.state() == (T0, T0 - 4_000, NOW)


def test_negative_settings_are_refused():
    with pytest.raises(ValueError, match="must not be negative"):
        WatermarkPolicy.from_seconds(-1, 0, 10)
