"""Per-bundle partial drift summaries: one element per feature, window and partition instead of one per value.

The drift branch used to send every reading of every event (six per event,
plus the score) downstream as its own element; windowing, combining and
the live windows' state then cost more per event than the device step (see
the README, Performance). The value DoFns now collect a bundle's values per
(feature, event-time window, partition) and, when the bundle finishes,
emit each group as one :class:`~transforms.drift_stats.WindowSummary`,
built with numpy (``WindowSummary.add_many``). Counts and bins are exact;
per-device moments are two-pass sums merged by Chan's update, so the
statistics are those of the values added one by one up to float rounding.

A partial carries the highest watermark evidence of its values (see
transforms/drift.py): the live windows observe it once per partial, which
is what observing each value gave, since only the maximum per partition and
bundle counts.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from models.drift_reference import DriftReference
from transforms.drift_stats import WindowSummary


class PartialSummary(NamedTuple):
    """Values of one feature in one window, from one partition and one bundle, and their highest evidence."""

    feature: str
    window_start: int
    partition: str
    evidence_ms: int
    summary: WindowSummary


class PartialSummaries:
    """Collects a bundle's values; ``emit()`` yields them as (feature, PartialSummary) at the window start."""

    def __init__(self, reference: DriftReference, window_ms: int):
        self._reference = reference
        self._window_ms = window_ms
        self._open: dict[tuple[str, int, str], list] = {}

    def add(self, feature: str, event_time: int, partition: str, evidence_ms: int, device_id: str,
            value: Optional[float]) -> None:
        start = event_time - event_time % self._window_ms
        key = (feature, start, partition)
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = [[], [], evidence_ms]
        elif evidence_ms > entry[2]:
            entry[2] = evidence_ms
        entry[0].append(device_id)
        entry[1].append(value)

    def emit(self) -> Iterator[WindowedValue]:
        """The bundle's partial summaries, in the global window, stamped inside their event-time window."""
        for (feature, start, partition), (device_ids, values, evidence_ms) in self._open.items():
            reference = self._reference.features[feature]
            summary = WindowSummary.empty(reference)
            summary.add_many(reference, device_ids, values)
            partial = PartialSummary(feature, start, partition, evidence_ms, summary)
            yield WindowedValue((feature, partial), Timestamp(micros=start * 1000), [GlobalWindow()])
        self._open = {}
