"""Per-device state: the plain logic, and its timers under a real watermark (EventStream).

DeviceStateDoFn is what runners that fire timers on time run;
EvidenceDeviceStateDoFn (transforms/in_process_runner.py) what the
in-process runner runs in streaming, where timers fire early: most timer
tests here drive the latter with early or lagging watermarks on purpose.
"""

from __future__ import annotations

from typing import Any, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.transforms.window import TimestampedValue

from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from models.rollout import RolloutConfig
from transforms.decode import DeviceEvents, ValidEvent
from transforms.device_state import DeviceLogic, DeviceStateDoFn
from transforms.in_process_runner import EvidenceDeviceStateDoFn, KeepDeviceStateOnEvidence
from transforms.offset_commits import SourcePosition

TTL_S = 10
CALIBRATION = 3
ARTIFACT = load_artifact(BUNDLED_MODEL_DIR)
ROLLOUT = RolloutConfig(str(BUNDLED_MODEL_DIR), calibration_events=CALIBRATION)
N = len(ARTIFACT.features)


def event(device: str, t_ms: int, offset: int, source_watermark_ms: int | None = None) -> ValidEvent:
    readings = {name: float(i + (t_ms // 1000) % 7) for i, name in enumerate(ARTIFACT.features)}
    return ValidEvent(f"{device}-{t_ms}", device, t_ms, readings, SourcePosition("t", 0, offset, offset),
                      t_ms if source_watermark_ms is None else source_watermark_ms, None, b"")


def logic() -> DeviceLogic:
    return DeviceLogic.for_artifact(ARTIFACT, TTL_S * 1000, calibration_events=CALIBRATION)


def _keyed(e: ValidEvent) -> tuple[str, DeviceEvents]:
    """The event as DecodeEvents hands it to the device state: alone in its DeviceEvents."""
    return e.device_id, DeviceEvents((e,))


def run_steps(events: list[ValidEvent]) -> list:
    state, results = None, []
    device = logic()
    for e in events:
        result = device.on_event(state, e.event_time, e.readings, "t:0")
        state = result.state
        results.append(result)
    return results


def level(step) -> float:
    """The alarm level in the head row: 0 until the device has calibrated."""
    return float(step.model_input[-1])


def test_gap_of_ttl_resets_the_state():
    times = [1000, 2000, 3000, 4000, 4000 + TTL_S * 1000]
    steps = run_steps([event("a", t, i) for i, t in enumerate(times)])
    assert not steps[3].reset and not steps[3].calibrating and level(steps[3]) > 0
    assert steps[4].reset and steps[4].calibrating and level(steps[4]) == 0.0


def test_gap_just_under_ttl_keeps_the_state():
    times = [1000, 2000, 3000, 3000 + TTL_S * 1000 - 1]
    steps = run_steps([event("a", t, i) for i, t in enumerate(times)])
    assert not steps[3].reset and not steps[3].calibrating


def test_out_of_order_event_is_scored_but_does_not_advance_the_state():
    in_order = run_steps([event("a", t, i) for i, t in enumerate([1000, 2000, 3000, 5000, 6000])])
    with_late = run_steps([event("a", t, i) for i, t in enumerate([1000, 2000, 3000, 5000, 4000, 6000])])
    assert not with_late[4].in_order and level(with_late[4]) > 0
    np.testing.assert_array_equal(in_order[4].model_input, with_late[5].model_input)


def test_missing_readings_are_imputed_and_masked():
    events = [event("a", t, i) for i, t in enumerate([1000, 2000, 3000, 4000])]
    events[3].readings[ARTIFACT.features[0]] = None
    del events[3].readings[ARTIFACT.features[1]]
    steps = run_steps(events)
    assert steps[3].imputed == ARTIFACT.features[:2]
    evidence, observed = steps[3].model_input[:N], steps[3].model_input[N:2 * N]
    assert list(observed) == [0.0, 0.0] + [1.0] * (N - 2)
    assert evidence[0] == evidence[1] == 0.0
    assert np.all(np.isfinite(steps[3].model_input))


class _KeepModelInputs(beam.DoFn):
    """Records the head row of each output in a class attribute: the test reads it after the run."""

    seen: dict = {}

    def process(self, output):
        context, model_input = output
        _KeepModelInputs.seen[context.event.event_id] = np.asarray(model_input)


def _model_inputs(stream: EventStream, device_state=EvidenceDeviceStateDoFn) -> dict:
    """Runs `device_state` on TestStream (BundleBasedDirectRunner); head rows by event_id."""
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    _KeepModelInputs.seen = {}
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | stream
            | beam.Map(_keyed).with_output_types(Tuple[str, Any])
            | beam.ParDo(device_state(ROLLOUT, TTL_S))
            | beam.ParDo(_KeepModelInputs())
        )
    return dict(_KeepModelInputs.seen)


def _late_a_after(watermark_s: int) -> EventStream:
    """a at 1 and 2 s (reclaim time 12 s); b read with watermark 20 s; the watermark at `watermark_s`; then a
    late a-5000, read with watermark 20 s too."""
    return (EventStream()
            .add_elements([_ts(event("a", 1000, 0)), _ts(event("a", 2000, 1))])
            .add_elements([_ts(event("b", 25_000, 2, source_watermark_ms=20_000))])
            .advance_watermark_to(watermark_s)
            .add_elements([_ts(event("a", 5000, 3, source_watermark_ms=20_000))])
            .advance_watermark_to_infinity())


def test_on_time_timers_clear_state_without_changing_a_score():
    """Whether a's timer fired before the late a-5000 (watermark 15 s) or not (10 s), a-5000 is read with a
    watermark past a's reclaim time: it starts afresh either way."""
    fired = _model_inputs(_late_a_after(15), DeviceStateDoFn)
    not_yet = _model_inputs(_late_a_after(10), DeviceStateDoFn)
    np.testing.assert_array_equal(fired["a-5000"], not_yet["a-5000"])
    assert fired["a-5000"][-1] == 0.0


def _rows_of(elements: list[tuple[str, DeviceEvents]]) -> dict:
    """Head rows by event_id of DeviceStateDoFn on `elements`, on the in-process runner."""
    _KeepModelInputs.seen = {}
    with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([])) as pipeline:
        _ = (pipeline
             | beam.Create(elements, reshuffle=False).with_output_types(Tuple[str, Any])
             | beam.ParDo(DeviceStateDoFn(ROLLOUT, TTL_S))
             | beam.ParDo(_KeepModelInputs()))
    return dict(_KeepModelInputs.seen)


def test_a_device_s_events_in_one_element_step_as_if_they_came_one_by_one():
    """Calibration, a reset after a gap and an out-of-order event inside one DeviceEvents: the same rows."""
    times = [1000 * t for t in (1, 2, 3, 4, 6, 5, 7)] + [7000 + TTL_S * 1000 + 1000 * t for t in (1, 2, 3)]
    events = {d: [event(d, t, i) for i, t in enumerate(times)] for d in ("a", "b")}
    one_by_one = _rows_of([_keyed(e) for d in events for e in events[d]])
    grouped = _rows_of([(d, DeviceEvents(tuple(events[d][:4]))) for d in events]
                       + [(d, DeviceEvents(tuple(events[d][4:]))) for d in events])
    assert len(one_by_one) == 2 * len(times)
    assert one_by_one.keys() == grouped.keys()
    for event_id, row in one_by_one.items():
        np.testing.assert_array_equal(grouped[event_id], row, err_msg=event_id)
    assert one_by_one["a-5000"][-1] > 0 and one_by_one[f"a-{8000 + TTL_S * 1000}"][-1] == 0.0  # calibrated, then reset


def _ts(e: ValidEvent) -> TimestampedValue:
    return TimestampedValue(e, e.event_time / 1000)


def test_timer_reclaims_state_once_the_source_watermark_passed_expiry():
    """a's timer fires at 12 s; a record of its partition carries watermark 20 s: the state goes.

    Clearing is visible only to a late event of a (event time before the expiry), which then
    starts from a fresh state: that is Beam's late-data semantics. With the state kept, a-5000
    would be a's third event and end its calibration (alarm level > 0); cleared, it is its first.
    """
    stream = (
        EventStream()
        .add_elements([_ts(event("a", 1000, 0)), _ts(event("a", 2000, 1))])
        .add_elements([_ts(event("b", 20_000, 2))])
        .advance_watermark_to(15)
        .add_elements([_ts(event("a", 5000, 3))])
        .advance_watermark_to_infinity()
    )
    rows = _model_inputs(stream)
    assert rows["a-5000"][-1] == 0.0


def test_early_timer_never_changes_a_score():
    """The runner's watermark passes a's expiry, but no record of its partition does: keep the state."""
    stream = (
        EventStream()
        .add_elements([_ts(event("a", 1000, 0)), _ts(event("a", 2000, 1))])
        .advance_watermark_to(60)
        .add_elements([_ts(event("a", 5000, 2))])
        .advance_watermark_to_infinity()
    )
    rows = _model_inputs(stream)
    expected = run_steps([event("a", 1000, 0), event("a", 2000, 1), event("a", 5000, 2)])
    np.testing.assert_allclose(rows["a-5000"], expected[2].model_input, atol=1e-6)
    assert rows["a-5000"][-1] > 0


def _live_devices_after(events: list[ValidEvent]) -> int:
    """devices_with_live_state at the end of a bounded FnApiRunner run (whose metrics are exact)."""
    pipeline = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([]))
    _ = (pipeline
         | beam.Create([_keyed(e) for e in events]).with_output_types(Tuple[str, Any])
         | beam.ParDo(EvidenceDeviceStateDoFn(ROLLOUT, TTL_S)))
    result = pipeline.run()
    result.wait_until_finish()
    query = beam.metrics.MetricsFilter().with_name("devices_with_live_state")
    return sum(c.committed for c in result.metrics().query(query)["counters"])


def test_live_device_gauge_counts_devices_holding_state_and_drops_on_reclaim():
    held = [event(f"d{i}", 1000, i) for i in range(3)]
    assert _live_devices_after(held) == 3  # no watermark evidence past expiry: the state stays
    reclaimed = [event(f"d{i}", 1000, i, source_watermark_ms=1000 + 2 * TTL_S * 1000) for i in range(3)]
    assert _live_devices_after(reclaimed) == 0


def test_timer_set_on_the_first_event_follows_the_device_and_reclaims_it_once_idle():
    """a's timer is set once, at 1 s + TTL; it fires while a is active, moves to a's expiry, and clears a later.

    At the first firing (11 s) a's last event is at 8 s and the partition's evidence is 15 s: kept, so
    a-9000 continues a's state. Evidence 30 s then passes a's expiry (19 s): a-9500 starts afresh.
    """
    stream = (
        EventStream()
        .add_elements([_ts(event("a", t, i)) for i, t in enumerate(range(1000, 9000, 1000))])
        .add_elements([_ts(event("b", 15_000, 8))])
        .advance_watermark_to(16)
        .add_elements([_ts(event("a", 9000, 9))])
        .add_elements([_ts(event("b", 30_000, 10))])
        .advance_watermark_to(40)
        .add_elements([_ts(event("a", 9500, 11))])
        .advance_watermark_to_infinity()
    )
    rows = _model_inputs(stream)
    assert rows["a-9000"][-1] > 0
    assert rows["a-9500"][-1] == 0.0


class _CountingFirings(EvidenceDeviceStateDoFn):
    """EvidenceDeviceStateDoFn that counts timer firings on a state in a class attribute (TestStream runs
    report few metrics)."""

    fired = 0

    def on_expiry(self, device_id, fire_ms, state, device, expiry) -> None:
        _CountingFirings.fired += 1
        super().on_expiry(device_id, fire_ms, state, device, expiry)


def test_a_timer_fired_ahead_of_the_data_parks_the_device_instead_of_following_it():
    """A device with an event every 9 s for 2,000 s while its partition's evidence never moves (what the
    in-process runner's early firings look like): its timer fires once and the device is parked, with no
    timer, never clearing the state. Following the device (re-arming at last event + TTL) fired 231 times."""
    stream = EventStream()
    for i, t_s in enumerate(range(1, 2000, 9)):
        stream = stream.add_elements([_ts(event("a", t_s * 1000, i, source_watermark_ms=500))])
        stream = stream.advance_watermark_to(t_s + 8)
    stream = stream.advance_watermark_to(2010)
    _CountingFirings.fired = 0
    seen = _run(stream, lambda keyed: keyed | beam.ParDo(_CountingFirings(ROLLOUT, TTL_S)))
    assert _CountingFirings.fired == 1
    assert len(seen) == 223 and seen["a-1999000"][-1] > 0  # one state throughout


def _run(stream: EventStream, device_state) -> dict:
    """Runs `device_state` (a function of the keyed stream) on TestStream; head rows by event_id."""
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    _KeepModelInputs.seen = {}
    with beam.Pipeline(options=options) as pipeline:
        keyed = pipeline | stream | beam.Map(_keyed).with_output_types(Tuple[str, Any])
        _ = device_state(keyed) | beam.ParDo(_KeepModelInputs())
    return dict(_KeepModelInputs.seen)


def _parked_then(*later: ValidEvent) -> EventStream:
    """a's two events carry evidence 0.5 s, so its timer (11 s), fired at watermark 20 s, parks it.
    Each later event is a bundle of its own."""
    stream = (EventStream()
              .add_elements([_ts(event("a", 1000, 0, source_watermark_ms=500)), _ts(event("a", 2000, 1, 500))])
              .advance_watermark_to(20))
    for e in later:
        stream = stream.add_elements([_ts(e)])
    return stream.advance_watermark_to_infinity()


def test_a_parked_device_is_cleared_when_its_partitions_evidence_passes_its_expiry():
    """b's record carries evidence 30 s past a's expiry (12 s): the wake-up step sends a check down a's key
    and a's state goes, so the late a-5000 starts afresh (kept, it would end a's calibration)."""
    woken = _run(_parked_then(event("b", 30_000, 2), event("a", 5000, 3)),
                 lambda keyed: keyed | KeepDeviceStateOnEvidence(ROLLOUT, TTL_S))
    assert woken["a-5000"][-1] == 0.0
    kept = _run(_parked_then(event("b", 30_000, 2, source_watermark_ms=500), event("a", 5000, 3)),
                lambda keyed: keyed | KeepDeviceStateOnEvidence(ROLLOUT, TTL_S))
    assert kept["a-5000"][-1] > 0


def test_a_parked_device_with_events_since_is_parked_again_at_its_new_expiry():
    """a is parked at 12 s, then sends at 10 s; evidence 16 s wakes it but its expiry is now 20 s: kept, so
    a-17000 continues its state; evidence 40 s then clears it, and a-20000 starts afresh."""
    rows = _run(_parked_then(event("a", 10_000, 2, 500), event("b", 16_000, 3), event("a", 17_000, 4, 500),
                             event("b", 40_000, 5), event("a", 20_000, 6, 500)),
                lambda keyed: keyed | KeepDeviceStateOnEvidence(ROLLOUT, TTL_S))
    assert rows["a-17000"][-1] > 0
    assert rows["a-20000"][-1] == 0.0
