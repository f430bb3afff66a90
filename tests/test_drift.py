"""ComputeDrift in a real Beam pipeline: windows close on the watermark, drift runs trigger retraining.

Under TestStream both closing rules are checked: Beam windowing
(transforms/drift.py), and the rule of streaming runs on the in-process
runner, the watermark evidence the values carry, which cannot close the last
window of a stream (transforms/in_process_runner.py).
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that
from apache_beam.transforms.window import TimestampedValue

from models.drift_reference import SCORE_FEATURE, build_reference
from schemas.serde import DRIFT, EVENT, RETRAIN, SCORE, AvroDecoder, AvroEncoder
from transforms.decode import DecodeEvents
from transforms.drift import DRIFT_STREAM, RETRAIN_STREAM, CloseDriftWindows, ComputeDrift
from transforms.event_time import WatermarkPolicy
from transforms.in_process_runner import CloseLiveDriftWindows
from transforms.kafka_sink import SCORES, OutgoingMessage
from transforms.kafka_source import KafkaRecord
from transforms.offset_commits import SourcePosition

START_MS = 1_700_000_040_000  # a multiple of 60 s: windows start with the stream
DEVICES = 10
RNG = np.random.default_rng(3)
REFERENCE = build_reference("v-test", ("x", "y"), RNG.normal(0.0, 1.0, (20_000, 2)), RNG.gamma(2.0, 0.5, 20_000))
ENCODE_EVENT, ENCODE_SCORE = AvroEncoder(EVENT), AvroEncoder(SCORE)
DECODE = {DRIFT_STREAM: AvroDecoder(DRIFT), RETRAIN_STREAM: AvroDecoder(RETRAIN)}


def event(step: int, device: int, shift_x: float) -> dict:
    readings = {"x": float(RNG.normal(shift_x, 1.0)), "y": float(RNG.normal(0.0, 1.0))}
    return {"event_id": f"e{step}-{device}", "device_id": f"d{device}", "event_time": START_MS + step * 1000,
            "readings": readings}


def record(e: dict, offset: int) -> KafkaRecord:
    return KafkaRecord("in", 0, offset, offset, None, ENCODE_EVENT(e), e["event_time"], e["event_time"],
                       e["event_time"])


def score_message(e: dict, offset: int) -> OutgoingMessage:
    score = {"event_id": e["event_id"], "device_id": e["device_id"], "event_time": e["event_time"],
             "score": float(RNG.gamma(2.0, 0.5)), "threshold": 9.0, "is_anomaly": False, "model_version": "v-test",
             "contributions": {}, "imputed": [], "processed_at": 0}
    return OutgoingMessage(SCORES, e["device_id"].encode(), ENCODE_SCORE(score), e["event_time"],
                           SourcePosition("in", 0, offset, offset), e["event_time"])


def stream(windows: int, shift_from_window: int) -> TestStream:
    """One element batch per second of event time; x shifts by 3 std from `shift_from_window` on."""
    test_stream = TestStream()
    for step in range(windows * 60):
        shift = 3.0 if step >= shift_from_window * 60 else 0.0
        events = [event(step, d, shift) for d in range(DEVICES)]
        elements = [TimestampedValue(record(e, step * DEVICES + d), e["event_time"] / 1000) for d, e in enumerate(events)]
        # scores come out of RunInference stamped at the end of the global window; ComputeDrift re-stamps them
        elements += [TimestampedValue(score_message(e, step * DEVICES + d), (START_MS + windows * 60_000) / 1000)
                     for d, e in enumerate(events)]
        test_stream = test_stream.add_elements(elements).advance_watermark_to((START_MS + step * 1000) / 1000)
    return test_stream.advance_watermark_to_infinity()


def decoded(stream_name: str):
    """The records of one output stream of ComputeDrift's messages."""
    return beam.FlatMap(lambda m: [DECODE[stream_name](m.value)] if m.stream == stream_name else [])


def run_drift(windows: int, shift_from_window: int, check_statistics, check_triggers, live=False,
              allowed_lateness_ms: int = 0) -> None:
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        mixed = p | stream(windows, shift_from_window)
        records = (mixed
                   | "Records" >> beam.Filter(lambda x: isinstance(x, KafkaRecord))
                   | "Polls" >> beam.Map(lambda record: (record,)))
        scores = mixed | "Scores" >> beam.Filter(lambda x: isinstance(x, OutgoingMessage))
        decode = records | DecodeEvents(rejected_inline=live)
        events = decode if live else decode["events"]
        close = CloseLiveDriftWindows if live else CloseDriftWindows
        policy = WatermarkPolicy(allowed_lateness_ms=allowed_lateness_ms)
        readings, score_drift = (events, scores) | ComputeDrift(REFERENCE, window_s=60, retrain_after_windows=2,
                                                               close=close, policy=policy)
        statistics = (readings | "R" >> decoded(DRIFT_STREAM), score_drift | "S" >> decoded(DRIFT_STREAM))
        triggers = (readings | "RT" >> decoded(RETRAIN_STREAM), score_drift | "ST" >> decoded(RETRAIN_STREAM))
        assert_that(statistics | "AllStatistics" >> beam.Flatten(), check_statistics, label="CheckStatistics")
        assert_that(triggers | "AllTriggers" >> beam.Flatten(), check_triggers, label="CheckTriggers")


def by_window(records: list[dict]) -> dict[tuple[int, str], dict]:
    return {((r["window_start"] - START_MS) // 60_000, r["feature"]): r for r in records}


@pytest.mark.parametrize("allowed_lateness_ms", [0, 90_000])
def test_shifted_feature_drifts_from_its_window_on_and_triggers_retraining_once(allowed_lateness_ms):
    """With an allowed lateness, windows fire that much later, in windows offset as much: the same records."""
    def check_statistics(records):
        got = by_window(records)
        assert sorted(got) == [(w, f) for w in range(4) for f in (SCORE_FEATURE, "x", "y")]
        for w in range(4):
            assert got[w, "x"]["drift"] == (w >= 1), got[w, "x"]
            assert not got[w, "y"]["drift"] and not got[w, SCORE_FEATURE]["drift"]
            assert got[w, "x"]["count"] == got[w, SCORE_FEATURE]["count"] == 60 * DEVICES
            assert got[w, "x"]["window_end"] - got[w, "x"]["window_start"] == 60_000

    def check_triggers(triggers):
        assert [(t["feature"], t["consecutive_windows"]) for t in triggers] == [("x", 2)]
        assert triggers[0]["first_window_start"] == START_MS + 60_000
        assert triggers[0]["last_window_end"] == START_MS + 180_000

    run_drift(windows=4, shift_from_window=1, check_statistics=check_statistics, check_triggers=check_triggers,
              allowed_lateness_ms=allowed_lateness_ms)


def test_unshifted_stream_has_no_drift_and_no_trigger():
    def check_statistics(records):
        assert len(records) == 9 and not any(r["drift"] for r in records)

    def check_triggers(triggers):
        assert triggers == []

    run_drift(windows=3, shift_from_window=99, check_statistics=check_statistics, check_triggers=check_triggers)


def test_without_timers_windows_close_on_the_evidence_the_values_carry_all_but_the_last():
    def check_statistics(records):
        got = by_window(records)
        assert sorted(got) == [(w, f) for w in range(3) for f in (SCORE_FEATURE, "x", "y")]
        assert [got[w, "x"]["drift"] for w in range(3)] == [False, True, True]
        assert all(r["count"] == 60 * DEVICES for r in records)

    def check_triggers(triggers):
        assert [(t["feature"], t["consecutive_windows"]) for t in triggers] == [("x", 2)]

    run_drift(windows=4, shift_from_window=1, check_statistics=check_statistics, check_triggers=check_triggers,
              live=True)
