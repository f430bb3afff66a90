"""The scoring path from raw input records to output messages, runner- and I/O-neutral."""

from __future__ import annotations

import apache_beam as beam

from models.rollout import RolloutConfig
from transforms.dead_letters import DeadLetterMessages
from transforms.decode import DecodeEvents
from transforms.device_state import KeepDeviceState
from transforms.event_time import WatermarkPolicy
from transforms.in_process_runner import KeepDeviceStateOnEvidence
from transforms.kafka_sink import OutgoingMessage
from transforms.read_order import InReadOrder
from transforms.scoring import ScoreEvents


class ScoreSensorRecords(beam.PTransform):
    """RecordBatches in; (decoded events, score and dead-letter OutgoingMessages) out.

    The decoded events (DecodeEvents' keyed stream) are returned too, so a
    branch such as drift reads each event decoded once; the messages are one
    stream.

    decode + validate (keyed by device) -> per-device state -> RunInference ->
    SensorScore, flattened with the rejected records' dead letters. Every
    input record yields exactly one output message, plus its shadow score
    when a shadow model runs (models/rollout.py). `in_process_streaming`
    takes the in-process runner's workarounds instead
    (transforms/in_process_runner.py; chosen by beam_jobs.pipelines).
    `in_read_order` gives the device state each device's events as one
    element in read order (transforms/read_order.py), for runners that do
    not keep their order (also chosen by beam_jobs.pipelines).
    """

    def __init__(self, *, rollout: RolloutConfig, state_ttl_s: float, max_batch_size: int, wire_format: str = "plain",
                 inference_device: str = "CPU", pseudonymize_key_env: str | None = None, audit: bool = False,
                 policy: WatermarkPolicy = WatermarkPolicy(), in_process_streaming: bool = False,
                 in_read_order: bool = False):
        super().__init__()
        self._in_read_order = in_read_order
        self._policy = policy
        self._in_process_streaming = in_process_streaming
        self._rollout = rollout
        self._state_ttl_s = state_ttl_s
        self._max_batch_size = max_batch_size
        self._wire_format = wire_format
        self._inference_device = inference_device
        self._pseudonymize_key_env = pseudonymize_key_env
        self._audit = audit

    def expand(self, records) -> tuple[beam.PCollection, beam.PCollection[OutgoingMessage]]:
        decode = DecodeEvents(self._wire_format, pseudonymize_key_env=self._pseudonymize_key_env, policy=self._policy,
                              rejected_inline=self._in_process_streaming)
        score = ScoreEvents(max_batch_size=self._max_batch_size, wire_format=self._wire_format,
                            device=self._inference_device, audit=self._audit)
        lateness_s = self._policy.allowed_lateness_ms / 1000
        if self._in_process_streaming:
            decoded = records | "Decode" >> decode
            device_state = KeepDeviceStateOnEvidence(self._rollout, self._state_ttl_s, lateness_s)
            return decoded, decoded | "DeviceState" >> device_state | "Score" >> score
        decoded, rejected = records | "Decode" >> decode
        keyed = decoded | "InReadOrder" >> InReadOrder() if self._in_read_order else decoded
        scores = keyed | "DeviceState" >> KeepDeviceState(self._rollout, self._state_ttl_s, lateness_s) \
            | "Score" >> score
        dead_letters = rejected | "DeadLetters" >> DeadLetterMessages(self._wire_format)
        return decoded, (scores, dead_letters) | "Messages" >> beam.Flatten()
