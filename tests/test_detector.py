"""The per-device detector against a batch oracle: streaming one event at a time equals the whole sequence.

The oracle runs the trained LstmForecaster over the whole recording at once
and applies the post-processing with numpy; the DeviceDetector gets the same
readings one event at a time (calibration buffer, replay, eager forecasts).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from apache_beam.coders import PickleCoder

from models.artifact import ModelArtifact
from models.detector import DeviceDetector, warm_up_events
from models.preprocessing import fit_baseline, forward_fill
from models.train import train
from tests.test_artifact import write_recording

CALIBRATION = 60


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> ModelArtifact:
    root = tmp_path_factory.mktemp("detector")
    return train([write_recording(root / "line.avro")], root / "model", epochs=5, seed=3, hidden_size=8,
                 calibration_events=CALIBRATION)


def detector(artifact: ModelArtifact, quantize: str = "none", calibration: int = CALIBRATION) -> DeviceDetector:
    return DeviceDetector(artifact.step(quantize), artifact.forecaster().residual_scale.numpy(),
                          artifact.post_processing, calibration)


def readings(seed: int, steps: int = 200, missing: float = 0.1) -> np.ndarray:
    """A device whose noisy first reading shifts by 10 sigma after step 150, with missing readings."""
    rng = np.random.default_rng(seed)
    raw = np.stack([3.0 + rng.normal(0, 0.05, steps), 1500 + 30 * np.cos(np.arange(steps) / 7),
                    20 + np.sin(np.arange(steps) / 10) + rng.normal(0, 0.1, steps)], axis=1)
    raw[150:, 0] += 0.5
    raw[rng.random(raw.shape) < missing] = np.nan
    return raw


def stream(d: DeviceDetector, raw: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    state, rows, flags = d.new_state(), [], []
    for values in raw:
        row, calibrating = d.update(state, values)
        rows.append(row)
        flags.append(calibrating)
    return np.stack(rows), flags


def oracle(artifact: ModelArtifact, raw: np.ndarray, n: int = CALIBRATION) -> np.ndarray:
    """The head rows of every event, computed over the whole sequence at once."""
    post, model = artifact.post_processing, artifact.forecaster()
    filled = forward_fill(raw)
    z = fit_baseline(filled[:n]).normalise(filled)
    with torch.no_grad():
        forecast = model(torch.from_numpy(z)[None])[0].numpy()
    contributions = np.zeros_like(z, dtype=np.float64)
    contributions[1:] = ((z[1:] - forecast) / model.residual_scale.numpy()) ** 2
    skip = warm_up_events(n)
    capped = np.minimum(contributions / np.maximum(contributions[skip:n].mean(axis=0), post.floor), post.cap)
    observed = ~np.isnan(raw)
    evidence, smoothed = np.zeros(raw.shape[1]), []
    for t in range(len(raw)):
        evidence = np.where(observed[t], post.alpha * capped[t] + (1 - post.alpha) * evidence, evidence)
        smoothed.append(evidence * observed[t])
    smoothed = np.stack(smoothed)
    level = max(np.quantile(smoothed.max(axis=1)[skip:n], post.quantile), 1e-6)
    rows = np.concatenate([smoothed, observed, np.full((len(raw), 1), level)], axis=1)
    rows[: n - 1] = np.concatenate([np.zeros_like(smoothed[: n - 1]), observed[: n - 1],
                                    np.zeros((n - 1, 1))], axis=1)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_one_event_at_a_time_equals_the_batch_computation(artifact, seed):
    raw = readings(seed)
    streamed, _ = stream(detector(artifact), raw)
    np.testing.assert_allclose(streamed, oracle(artifact, raw), rtol=1e-4, atol=1e-4)


def test_the_level_shift_scores_above_the_threshold_and_normal_rows_below(artifact):
    raw = readings(5, missing=0.0)
    rows, _ = stream(detector(artifact), raw)
    with torch.no_grad():
        scores = artifact.head()(torch.from_numpy(rows))[:, 0].numpy()
    assert np.mean(scores[CALIBRATION:150] > artifact.threshold) < 0.05
    assert np.mean(scores[165:] > artifact.threshold) > 0.9


def test_calibration_is_the_first_n_events_and_scores_nothing_until_its_last(artifact):
    rows, flags = stream(detector(artifact), readings(3))
    assert flags == [True] * CALIBRATION + [False] * (200 - CALIBRATION)
    assert np.all(rows[: CALIBRATION - 1, -1] == 0.0)  # alarm level 0: the head scores 0
    assert np.all(rows[CALIBRATION - 1:, -1] > 0.0) and len(set(rows[CALIBRATION - 1:, -1])) == 1


def test_the_baseline_is_the_median_and_std_of_the_forward_filled_calibration_rows(artifact):
    raw = readings(4)
    d = detector(artifact)
    state = d.new_state()
    for values in raw[:CALIBRATION]:
        d.update(state, values)
    filled = forward_fill(raw[:CALIBRATION])
    np.testing.assert_allclose(state.baseline.median, np.nanmedian(filled, axis=0))
    np.testing.assert_allclose(state.baseline.scale, np.nanstd(filled, axis=0))
    assert state.buffer is None


def test_missing_readings_add_no_evidence_and_never_poison_the_state(artifact):
    raw = readings(6, missing=0.0)
    raw[100:130, 0] = np.nan  # a sensor drops out for 30 events
    raw[:, 2] = np.nan  # and one never reports at all
    rows, _ = stream(detector(artifact), raw)
    n = raw.shape[1]
    assert np.all(np.isfinite(rows))
    assert np.all(rows[100:130, 0] == 0.0) and np.all(rows[100:130, n] == 0.0)  # no evidence, not observed
    assert np.all(rows[:, 2] == 0.0) and np.all(rows[:, n + 2] == 0.0)
    np.testing.assert_allclose(rows, oracle(artifact, raw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [10, CALIBRATION - 1, CALIBRATION, 120])
@pytest.mark.parametrize(
    "clone",
    [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s)), lambda s: PickleCoder().decode(PickleCoder().encode(s))],
    ids=["deepcopy", "pickle", "beam-pickle-coder"],
)
def test_a_copied_state_continues_exactly_like_the_original(artifact, clone, split):
    raw = readings(7)
    d = detector(artifact)
    state = d.new_state()
    for values in raw[:split]:
        d.update(state, values)
    copied = clone(state)
    original = [d.update(state, values)[0] for values in raw[split:]]
    continued = [d.update(copied, values)[0] for values in raw[split:]]
    np.testing.assert_array_equal(np.stack(continued), np.stack(original))


def test_int8_is_deterministic_and_close_to_float(artifact):
    raw = readings(8)
    first, _ = stream(detector(artifact, "int8"), raw)
    second, _ = stream(detector(artifact, "int8"), raw)
    float_rows, _ = stream(detector(artifact), raw)
    np.testing.assert_array_equal(first, second)
    n = raw.shape[1]
    assert np.corrcoef(first[CALIBRATION:, :n].ravel(), float_rows[CALIBRATION:, :n].ravel())[0, 1] > 0.95
