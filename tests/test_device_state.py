"""Per-device state: the plain logic, and its timers under a real watermark (EventStream)."""

from __future__ import annotations

from typing import Any, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.transforms.window import TimestampedValue

from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from transforms.decode import ValidEvent
from transforms.device_state import DeviceLogic, DeviceStateDoFn
from transforms.offset_commits import SourcePosition

TTL_S = 10
ARTIFACT = load_artifact(BUNDLED_MODEL_DIR)
H = ARTIFACT.hidden_size


def event(device: str, t_ms: int, offset: int, source_watermark_ms: int | None = None) -> ValidEvent:
    readings = {name: float(i + t_ms % 7) for i, name in enumerate(ARTIFACT.features)}
    return ValidEvent(f"{device}-{t_ms}", device, t_ms, readings, SourcePosition("t", 0, offset, offset),
                      t_ms if source_watermark_ms is None else source_watermark_ms, None, b"")


def logic() -> DeviceLogic:
    return DeviceLogic(ARTIFACT, TTL_S * 1000, calibration_events=3)


def run_steps(events: list[ValidEvent]) -> list:
    state, results = None, []
    device = logic()
    for e in events:
        result = device.on_event(state, e.event_time, e.readings, "t:0")
        state = result.state
        results.append(result)
    return results


def test_gap_of_ttl_resets_the_state():
    steps = run_steps([event("a", 1000, 0), event("a", 2000, 1), event("a", 2000 + TTL_S * 1000, 2)])
    assert not steps[1].reset and np.any(steps[1].model_input[:H] != 0)
    assert steps[2].reset and np.all(steps[2].model_input[:H] == 0)
    assert steps[2].calibrating


def test_gap_just_under_ttl_keeps_the_state():
    steps = run_steps([event("a", 1000, 0), event("a", 1000 + TTL_S * 1000 - 1, 1)])
    assert not steps[1].reset and np.any(steps[1].model_input[:H] != 0)


def test_out_of_order_event_is_scored_but_does_not_advance_the_state():
    in_order = run_steps([event("a", 1000, 0), event("a", 3000, 1), event("a", 4000, 2)])
    with_late = run_steps([event("a", 1000, 0), event("a", 3000, 1), event("a", 2000, 2), event("a", 4000, 3)])
    assert not with_late[2].in_order
    np.testing.assert_array_equal(with_late[2].model_input[:H], with_late[3].model_input[:H])
    np.testing.assert_array_equal(in_order[2].model_input, with_late[3].model_input)


def test_missing_readings_are_imputed_and_masked():
    first, second = event("a", 1000, 0), event("a", 2000, 1)
    second.readings[ARTIFACT.features[0]] = None
    del second.readings[ARTIFACT.features[1]]
    steps = run_steps([first, second])
    n = len(ARTIFACT.features)
    assert steps[1].imputed == ARTIFACT.features[:2]
    mask = steps[1].model_input[H + n:]
    assert list(mask) == [0.0, 0.0] + [1.0] * (n - 2)
    assert np.all(np.isfinite(steps[1].model_input))


class _KeepHiddenStates(beam.DoFn):
    """Records h_{t-1} of each output in a class attribute: the test reads it after the run."""

    seen: dict = {}

    def process(self, output):
        context, model_input = output
        _KeepHiddenStates.seen[context.event.event_id] = model_input[:H].numpy()


def _hidden_states(stream: EventStream) -> dict:
    """Runs DeviceStateDoFn on TestStream (BundleBasedDirectRunner); h_{t-1} by event_id."""
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    _KeepHiddenStates.seen = {}
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | stream
            | beam.Map(lambda e: (e.device_id, e)).with_output_types(Tuple[str, Any])
            | beam.ParDo(DeviceStateDoFn(str(BUNDLED_MODEL_DIR), TTL_S, calibration_events=3))
            | beam.ParDo(_KeepHiddenStates())
        )
    return dict(_KeepHiddenStates.seen)


def _ts(e: ValidEvent) -> TimestampedValue:
    return TimestampedValue(e, e.event_time / 1000)


def test_timer_reclaims_state_once_the_source_watermark_passed_expiry():
    """a's timer fires at 12 s; a record of its partition carries watermark 20 s: the state goes.

    Clearing is visible only to a late event of a (event time before the expiry), which then
    starts from a fresh state: that is Beam's late-data semantics.
    """
    stream = (
        EventStream()
        .add_elements([_ts(event("a", 1000, 0)), _ts(event("a", 2000, 1))])
        .add_elements([_ts(event("b", 20_000, 2))])
        .advance_watermark_to(15)
        .add_elements([_ts(event("a", 5000, 3))])
        .advance_watermark_to_infinity()
    )
    hidden = _hidden_states(stream)
    assert np.any(hidden["a-2000"] != 0)
    assert not np.any(hidden["a-5000"])


def test_early_timer_never_changes_a_score():
    """The runner's watermark passes a's expiry, but no record of its partition does: keep the state."""
    stream = (
        EventStream()
        .add_elements([_ts(event("a", 1000, 0)), _ts(event("a", 2000, 1))])
        .advance_watermark_to(60)
        .add_elements([_ts(event("a", 5000, 2))])
        .advance_watermark_to_infinity()
    )
    hidden = _hidden_states(stream)
    expected = run_steps([event("a", 1000, 0), event("a", 2000, 1), event("a", 5000, 2)])
    np.testing.assert_allclose(hidden["a-5000"], expected[2].model_input[:H], atol=1e-6)
    assert np.any(hidden["a-5000"] != 0)
