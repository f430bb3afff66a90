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
bundle counts. It also carries the id of the bundle that made it, as the
rule "a partition's evidence counts from its next bundle on" needs.

Partials are also the wire form between the scoring processes of a
``--local_processes`` job and its drift merger: :class:`PartialsToMessagesFn`
writes them as ``sensors.DriftPartial`` Avro records, keyed by input
partition so one partition's partials stay in order, and
:class:`PartialsFromRecordsFn` reads them back (beam_jobs/drift_merge.py).
"""

from __future__ import annotations

import math
import uuid
from typing import Iterator, Mapping, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.utils.windowed_value import WindowedValue

from models.drift_reference import DriftReference
from schemas.serde import DRIFT_PARTIAL, AvroDecoder, AvroEncoder, SerdeError
from transforms.drift_stats import DeviceIndex, WindowSummary
from transforms.kafka_sink import OutgoingMessage
from transforms.kafka_source import RecordBatch
from transforms.windowing import stamped

DRIFT_PARTIALS_STREAM = "drift_partials"


class PartialSummary(NamedTuple):
    """Values of one feature in one window, from one partition and one bundle, and their highest evidence."""

    feature: str
    window_start: int
    partition: str
    evidence_ms: int
    bundle: str
    summary: WindowSummary

    def to_record(self) -> dict:
        """The ``sensors.DriftPartial`` record."""
        summary = self.summary
        return {
            "feature": self.feature, "window_start": self.window_start, "partition": self.partition,
            "evidence_ms": self.evidence_ms, "bundle": self.bundle, "events": summary.events,
            "missing": summary.missing, "psi_counts": summary.psi_counts.tolist(),
            "ks_counts": summary.ks_counts.tolist(), "device_ids": [i.decode() for i in summary.device_ids.tolist()],
            "device_n": summary.device_n.tolist(), "device_mean": summary.device_mean.tolist(),
            "device_m2": summary.device_m2.tolist(),
        }

    @classmethod
    def from_record(cls, record: dict) -> PartialSummary:
        summary = WindowSummary(
            np.array(record["psi_counts"], np.int64), np.array(record["ks_counts"], np.int64),
            record["events"], record["missing"], np.array([i.encode() for i in record["device_ids"]], dtype=bytes),
            np.array(record["device_n"], np.int64), np.array(record["device_mean"], np.float64),
            np.array(record["device_m2"], np.float64))
        return cls(record["feature"], record["window_start"], record["partition"], record["evidence_ms"],
                   record["bundle"], summary)


class PartialSummaries:
    """Collects a bundle's values; ``emit()`` yields them as (feature, PartialSummary) at the window start.

    An event's values are kept as the one mapping it came with and split
    into features only when the bundle ends, once per (window, partition)
    group rather than once per event and feature; the group's devices are
    numbered once for all its features.
    """

    def __init__(self, reference: DriftReference, window_ms: int, features: tuple[str, ...]):
        self._reference = reference
        self._window_ms = window_ms
        self._features = features
        self._open: dict[tuple[int, str], list] = {}
        self._bundle = uuid.uuid4().hex

    def add(self, event_time: int, partition: str, evidence_ms: int, device_id: str,
            values: Mapping[str, Optional[float]]) -> None:
        """One event's values of the features (a missing one counts as missing)."""
        start = event_time - event_time % self._window_ms
        key = (start, partition)
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = [[], [], evidence_ms]
        elif evidence_ms > entry[2]:
            entry[2] = evidence_ms
        entry[0].append(device_id)
        entry[1].append(values)

    def emit(self) -> Iterator[WindowedValue]:
        """The bundle's partial summaries, in the global window, stamped inside their event-time window."""
        for (start, partition), (device_ids, rows, evidence_ms) in self._open.items():
            devices = DeviceIndex(device_ids)
            columns = _readings_matrix(rows, self._features)
            for feature, column in zip(self._features, columns.T):
                reference = self._reference.features[feature]
                summary = WindowSummary.empty(reference)
                summary.add_column(reference, devices, column)
                partial = PartialSummary(feature, start, partition, evidence_ms, self._bundle, summary)
                yield stamped((feature, partial), start)
        self._open = {}
        self._bundle = uuid.uuid4().hex


def _readings_matrix(rows: list[Mapping[str, Optional[float]]], features: tuple[str, ...]) -> np.ndarray:
    """One row per event, one column per feature; NaN where the event has no value."""
    return np.array([[math.nan if v is None else v for v in map(row.get, features)] for row in rows],
                    dtype=np.float64).reshape(len(rows), len(features))


class PartialsToMessagesFn(beam.DoFn):
    """(feature, PartialSummary) -> an OutgoingMessage of its DriftPartial record, keyed by input partition."""

    def __init__(self, wire_format: str):
        self._wire_format = wire_format

    def setup(self) -> None:
        self._encode = AvroEncoder(DRIFT_PARTIAL, self._wire_format)

    def process(self, element: tuple[str, PartialSummary]) -> Iterator[OutgoingMessage]:
        _, partial = element
        yield OutgoingMessage(DRIFT_PARTIALS_STREAM, partial.partition.encode(), self._encode(partial.to_record()),
                              partial.window_start, None)


class PartialsFromRecordsFn(beam.DoFn):
    """RecordBatches of DriftPartial -> (feature, PartialSummary) at the window start; undecodable ones are counted.

    The partials topic is written by this job's own processes only, so a
    record that does not decode is a bug or a stranger on an internal topic:
    it is dropped and counted, not dead-lettered.
    """

    def __init__(self, wire_format: str):
        self._wire_format = wire_format
        self._undecodable = beam.metrics.Metrics.counter("drift", "undecodable_partials")

    def setup(self) -> None:
        self._decode = AvroDecoder(DRIFT_PARTIAL, self._wire_format)

    def process(self, records: RecordBatch) -> Iterator[WindowedValue]:
        for record in records:
            try:
                partial = PartialSummary.from_record(self._decode(record.value))
            except SerdeError:
                self._undecodable.inc()
                continue
            yield stamped((partial.feature, partial), partial.window_start)
