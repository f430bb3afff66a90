"""RunInference scoring: score records from the head, and failed batches as dead letters."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import torch
from apache_beam.testing.util import assert_that, equal_to

from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from schemas.serde import SCORE, AvroDecoder
from transforms.decode import ValidEvent
from transforms.device_state import ScoringContext
from transforms.offset_commits import SourcePosition
from transforms.scoring import ScoreEvents

ARTIFACT = load_artifact(BUNDLED_MODEL_DIR)
N = len(ARTIFACT.features)
WIDTH = ARTIFACT.hidden_size + 2 * N


def context(i: int, calibrating: bool = False) -> ScoringContext:
    event = ValidEvent(f"e{i}", f"d{i % 3}", 1_750_000_000_000 + i, {}, SourcePosition("in", 0, i, i), 0,
                       b"key", b"value%d" % i)
    return ScoringContext(event, (ARTIFACT.features[0],), calibrating)


def model_input(seed: int, observed_first: bool = False) -> torch.Tensor:
    rows = np.random.default_rng(seed).normal(size=WIDTH).astype(np.float32)
    rows[ARTIFACT.hidden_size + N:] = 1.0
    rows[ARTIFACT.hidden_size + N] = float(observed_first)
    return torch.from_numpy(rows)


def test_every_input_yields_one_score_equal_to_the_head_output():
    inputs = [(context(i, calibrating=i < 2), model_input(i)) for i in range(10)]
    with torch.no_grad():
        expected = ARTIFACT.head()(torch.stack([t for _, t in inputs])).numpy()
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
        messages, dead = pipeline | beam.Create(inputs) | ScoreEvents(str(BUNDLED_MODEL_DIR), max_batch_size=4)
        assert_that(messages, check, label="scores")
        assert_that(dead, equal_to([]), label="no dead letters")


def test_a_failing_batch_becomes_dead_letters_with_the_original_bytes():
    good = [(context(i), model_input(i)) for i in range(3)]
    broken = [(context(100), torch.zeros(WIDTH + 1))]  # a row the head cannot split

    def check(letters):
        assert [source.offset for source, _ in letters] == [100]
        record = letters[0][1]
        assert record["stage"] == "inference" and "inference failed" in record["error"]
        assert record["value"] == b"value100"

    with beam.Pipeline() as pipeline:
        messages, dead = pipeline | beam.Create(good + broken) | ScoreEvents(str(BUNDLED_MODEL_DIR), max_batch_size=1)
        assert_that(messages | beam.Map(decode_id), equal_to(["e0", "e1", "e2"]), label="scores")
        assert_that(dead, check, label="dead")


def decode_id(message) -> str:
    return AvroDecoder(SCORE)(message.value)["event_id"]
