"""The scoring path from raw input records to output messages, runner- and I/O-neutral."""

from __future__ import annotations

from typing import Any, Tuple

import apache_beam as beam

from transforms.dead_letters import EncodeDeadLetters
from transforms.decode import DecodeEvents, ValidEvent
from transforms.device_state import DeviceStateDoFn
from transforms.scoring import ScoreEvents


def _by_device(event: ValidEvent) -> tuple[str, ValidEvent]:
    return event.device_id, event


class ScoreSensorRecords(beam.PTransform):
    """KafkaRecords in; (score messages, dead-letter messages) out.

    decode + validate -> key by device -> per-device state -> RunInference ->
    SensorScore. Every input record yields exactly one output message.
    """

    def __init__(self, *, model_dir: str, state_ttl_s: float, calibration_events: int, max_batch_size: int,
                 wire_format: str = "plain", inference_device: str = "CPU"):
        super().__init__()
        self._model_dir = model_dir
        self._state_ttl_s = state_ttl_s
        self._calibration_events = calibration_events
        self._max_batch_size = max_batch_size
        self._wire_format = wire_format
        self._inference_device = inference_device

    def expand(self, records):
        decoded = records | "Decode" >> DecodeEvents(self._wire_format)
        model_inputs = (
            decoded.events
            | "KeyByDevice" >> beam.Map(_by_device).with_output_types(Tuple[str, Any])
            | "DeviceState" >> beam.ParDo(DeviceStateDoFn(self._model_dir, self._state_ttl_s, self._calibration_events))
        )
        scores, inference_dead = model_inputs | "Score" >> ScoreEvents(
            self._model_dir, max_batch_size=self._max_batch_size, wire_format=self._wire_format,
            device=self._inference_device,
        )
        dead = (
            (decoded.dead_letters, inference_dead)
            | "AllDeadLetters" >> beam.Flatten()
            | "EncodeDeadLetters" >> EncodeDeadLetters(self._wire_format)
        )
        return scores, dead
