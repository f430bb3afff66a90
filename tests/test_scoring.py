"""RunInference scoring: score records from the head; failed batches and rejected records as dead letters."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import torch
from apache_beam.testing.util import assert_that, equal_to

from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from models.rollout import PRIMARY, ServedModel
from schemas.serde import DEAD_LETTER, SCORE, AvroDecoder
from transforms.dead_letters import dead_letter
from transforms.decode import ValidEvent
from transforms.device_state import ScoringContext
from transforms.kafka_sink import DEAD_LETTERS, SCORES
from transforms.offset_commits import SourcePosition
from transforms.scoring import ScoreEvents

ARTIFACT = load_artifact(BUNDLED_MODEL_DIR)
N = len(ARTIFACT.features)
WIDTH = 2 * N + 1  # [evidence, observed, alarm level]
PRIMARY_MODEL = ServedModel(PRIMARY, ARTIFACT.version, ARTIFACT.features, ARTIFACT.threshold)


def context(i: int, calibrating: bool = False) -> ScoringContext:
    event = ValidEvent(f"e{i}", f"d{i % 3}", 1_750_000_000_000 + i, {}, SourcePosition("in", 0, i, i), 0,
                       b"key", b"value%d" % i)
    return ScoringContext(event, (ARTIFACT.features[0],), calibrating, PRIMARY_MODEL)


def model_input(seed: int, observed_first: bool = False) -> np.ndarray:
    rows = np.abs(np.random.default_rng(seed).normal(size=WIDTH)).astype(np.float32) * 3
    rows[N:2 * N] = 1.0
    rows[N] = float(observed_first)
    return rows


def test_every_input_yields_one_score_equal_to_the_head_output():
    inputs = [(context(i, calibrating=i < 2), model_input(i)) for i in range(10)]
    with torch.no_grad():
        expected = ARTIFACT.head()(torch.from_numpy(np.stack([t for _, t in inputs]))).numpy()
    decode = AvroDecoder(SCORE)

    def check(messages):
        records = {decode(m.value)["event_id"]: (m, decode(m.value)) for m in messages}
        assert len(records) == 10
        for i, (ctx, _) in enumerate(inputs):
            message, score = records[ctx.event.event_id]
            assert message.key == ctx.event.device_id.encode() and message.source == ctx.event.source
            np.testing.assert_allclose(score["score"], expected[i, 0], rtol=1e-5)
            np.testing.assert_allclose([score["contributions"][f] for f in ARTIFACT.features], expected[i, 1:],
                                       rtol=1e-5, atol=1e-7)
            assert score["contributions"][ARTIFACT.features[0]] == 0.0  # imputed: no share of the score
            assert score["is_anomaly"] == (i >= 2 and score["score"] > ARTIFACT.threshold)
            assert score["imputed"] == [ARTIFACT.features[0]] and score["model_version"] == ARTIFACT.version

    with beam.Pipeline() as pipeline:
        messages = pipeline | beam.Create(inputs) | ScoreEvents(max_batch_size=4)
        assert_that(messages, check, label="scores")
        assert_that(messages | beam.Map(lambda m: m.stream), equal_to([SCORES] * 10), label="all scores")


def test_failed_batches_and_rejected_records_become_dead_letters_with_the_original_bytes():
    good = [(context(i), model_input(i)) for i in range(3)]
    broken = [(context(100), np.zeros(WIDTH + 1, dtype=np.float32))]  # a row the head cannot split
    rejected = dead_letter(SourcePosition("in", 1, 7, 5), b"k", b"junk", "bad bytes", "decode")

    def check(messages):
        letters = {m.source.offset: AvroDecoder(DEAD_LETTER)(m.value) for m in messages}
        assert sorted(letters) == [7, 100]
        assert letters[100]["stage"] == "inference" and "inference failed" in letters[100]["error"]
        assert letters[100]["value"] == b"value100"
        assert letters[7] == rejected.record

    with beam.Pipeline() as pipeline:
        messages = (pipeline | beam.Create(good + broken + [(rejected, None)])
                    | ScoreEvents(max_batch_size=1))
        scores = messages | "Scores" >> beam.Filter(lambda m: m.stream == SCORES)
        dead = messages | "Dead" >> beam.Filter(lambda m: m.stream == DEAD_LETTERS)
        assert_that(scores | beam.Map(decode_id), equal_to(["e0", "e1", "e2"]), label="scores")
        assert_that(dead, check, label="dead")


def decode_id(message) -> str:
    return AvroDecoder(SCORE)(message.value)["event_id"]
