"""Each device's events in one element, in the order they were read: for runners that do not keep it.

Beam promises a stateful DoFn its key's elements in no particular order.
The device state steps its LSTM once per event in the order it sees them,
so the order is part of the score. Runners in streaming keep it (one
partition feeds a device, and the channel from a reader to the device's
worker is first-in first-out), and so does the in-process runner, but
Flink's batch runner groups a stateful stage's input by key with a sort
that does not: file mode on Flink with 6,000 events of 20 devices scored
only 1,413 of them as the in-process runner did (tests/test_flink.py).

Grouping the device's elements and sorting them by where each event was
read (topic or file, partition, offset) gives the device state one element
with the events in read order, whatever order the runner delivered them in.
It costs a GroupByKey that holds the device's events of the run, so only
the runners that need it take it (beam_jobs.pipelines.reorders_keyed_input).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from transforms.decode import DeviceEvents, ValidEvent
from transforms.windowing import stamped


def read_position(event: ValidEvent) -> tuple[str, int, int]:
    return event.source.topic, event.source.partition, event.source.offset


def in_read_order(device_id: str, elements: Iterable[DeviceEvents]) -> WindowedValue:
    """The device's events of all `elements` as one DeviceEvents, sorted by read position, at the earliest time."""
    events = tuple(sorted((e for element in elements for e in element.events), key=read_position))
    return stamped((device_id, DeviceEvents(events)), min(e.event_time for e in events))


class _InReadOrderFn(beam.DoFn):
    def process(self, grouped: tuple[str, Iterable[DeviceEvents]]) -> Iterator[WindowedValue]:
        yield in_read_order(*grouped)


class InReadOrder(beam.PTransform):
    """(device_id, DeviceEvents) in; one (device_id, DeviceEvents) per device and window out, in read order."""

    def expand(self, keyed: beam.PCollection[tuple[str, DeviceEvents]]) -> beam.PCollection[tuple[str, DeviceEvents]]:
        return keyed | "ByDevice" >> beam.GroupByKey() | "Sorted" >> beam.ParDo(_InReadOrderFn())
