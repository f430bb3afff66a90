"""The scoring path from raw input records to output messages, runner- and I/O-neutral."""

from __future__ import annotations

import apache_beam as beam

from models.rollout import RolloutConfig
from transforms.decode import DecodeEvents
from transforms.device_state import KeepDeviceState
from transforms.event_time import WatermarkPolicy
from transforms.kafka_sink import OutgoingMessage
from transforms.scoring import ScoreEvents


class ScoreSensorRecords(beam.PTransform):
    """RecordBatches in; (decoded events, score and dead-letter OutgoingMessages) out.

    The decoded events (DecodeEvents' keyed stream) are returned too, so a
    branch such as drift reads each event decoded once; the messages are one
    stream.

    decode + validate (keyed by device) -> per-device state -> RunInference ->
    SensorScore; rejected records ride along to become dead letters. Every
    input record yields exactly one output message, plus its shadow score
    when a shadow model runs (models/rollout.py). One stream, because a
    Flatten would hold streaming output back on the in-process runner (see
    transforms/kafka_sink.py).
    """

    def __init__(self, *, rollout: RolloutConfig, state_ttl_s: float, max_batch_size: int, wire_format: str = "plain",
                 inference_device: str = "CPU", pseudonymize_key_env: str | None = None, audit: bool = False,
                 policy: WatermarkPolicy = WatermarkPolicy()):
        super().__init__()
        self._policy = policy
        self._rollout = rollout
        self._state_ttl_s = state_ttl_s
        self._max_batch_size = max_batch_size
        self._wire_format = wire_format
        self._inference_device = inference_device
        self._pseudonymize_key_env = pseudonymize_key_env
        self._audit = audit

    def expand(self, records) -> tuple[beam.PCollection, beam.PCollection[OutgoingMessage]]:
        decoded = records | "Decode" >> DecodeEvents(
            self._wire_format, pseudonymize_key_env=self._pseudonymize_key_env, policy=self._policy)
        messages = (
            decoded
            | "DeviceState" >> KeepDeviceState(self._rollout, self._state_ttl_s)
            | "Score" >> ScoreEvents(max_batch_size=self._max_batch_size, wire_format=self._wire_format,
                                     device=self._inference_device, audit=self._audit)
        )
        return decoded, messages
