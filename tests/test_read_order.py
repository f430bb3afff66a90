"""transforms.read_order: a device's events in one element, sorted by where they were read."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.decode import DeviceEvents, ValidEvent
from transforms.offset_commits import SourcePosition
from transforms.read_order import InReadOrder, in_read_order


def event(offset: int, event_time: int, partition: int = 0) -> ValidEvent:
    return ValidEvent(f"e{partition}-{offset}", "d", event_time, {}, SourcePosition("t", partition, offset, offset),
                      None, b"d", b"")


def test_in_read_order_sorts_by_partition_and_offset_and_stamps_the_earliest_time():
    later = DeviceEvents((event(5, 900), event(6, 100)))  # out of order in event time: read order wins
    earlier = DeviceEvents((event(2, 300), event(3, 400)))
    merged = in_read_order("d", [later, earlier, DeviceEvents((event(0, 50, partition=1),))])
    device, events = merged.value
    assert device == "d"
    assert [(e.source.partition, e.source.offset) for e in events.events] == [(0, 2), (0, 3), (0, 5), (0, 6), (1, 0)]
    assert merged.timestamp.micros == 50 * 1000


def test_in_read_order_gives_one_element_per_device_in_a_pipeline():
    elements = [("a", DeviceEvents((event(4, 4),))), ("b", DeviceEvents((event(1, 1),))),
                ("a", DeviceEvents((event(2, 2), event(3, 3))))]
    with BeamTestPipeline(runner="FnApiRunner") as pipeline:
        offsets = (pipeline | beam.Create(elements) | InReadOrder()
                   | beam.MapTuple(lambda device, events: (device, [e.source.offset for e in events.events])))
        assert_that(offsets, equal_to([("a", [2, 3, 4]), ("b", [1])]))
