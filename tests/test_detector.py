"""The per-device detector against a batch oracle: streaming one event at a time equals the whole sequence.

The oracle runs the trained LstmForecaster's torch LSTM (not the numpy cell
the detector steps) over the recording, imputing missing readings with
numpy's own conditional-mean algebra blended with the forecast; without
missing readings that is one full-sequence call. It applies the
post-processing (residual and level evidence) with numpy over the whole
sequence; the DeviceDetector gets the same readings one event at a time
(calibration buffer, replay, eager forecasts).
"""

from __future__ import annotations

import copy
from dataclasses import replace
import pickle

import numpy as np
import pytest
import torch
from apache_beam.coders import PickleCoder

from models.artifact import ModelArtifact
from models.detector import GAP_DECAY, DetectorState, DeviceDetector, PostProcessing, warm_up_events
from models.preprocessing import IMPUTER_RIDGE, fit_baseline, forward_fill
from models.train import train
from tests.test_artifact import write_recording

CALIBRATION = 60


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> ModelArtifact:
    root = tmp_path_factory.mktemp("detector")
    return train([write_recording(root / "line.avro")], root / "model", epochs=5, seed=3, hidden_size=8,
                 calibration_events=CALIBRATION)


def detector(artifact: ModelArtifact, quantize: str = "none", calibration: int = CALIBRATION,
             post: PostProcessing | None = None) -> DeviceDetector:
    return artifact.detector(calibration, quantize, post)


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


def conditional_mean(z: np.ndarray, missing: np.ndarray, calibration_z: np.ndarray) -> np.ndarray:
    """A row's missing z by its Gaussian conditional mean given the row's present z (calibration moments)."""
    mean = calibration_z.mean(axis=0)
    cov = np.cov(calibration_z.T, bias=True) + IMPUTER_RIDGE * np.eye(len(z))
    z, m, o = z.astype(np.float64), missing, ~missing
    z[m] = mean[m] + cov[np.ix_(m, o)] @ np.linalg.inv(cov[np.ix_(o, o)]) @ (z[o] - mean[o])
    return z


def forecasts(model, z: np.ndarray, missing: np.ndarray, calibration_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z with missing readings imputed, forecasts of z[1:]): torch's LSTM, one call if nothing is missing."""
    if not missing.any():
        with torch.no_grad():
            return z, model(torch.from_numpy(z)[None])[0].numpy()
    z, out, state, gap, forecast = z.copy(), [], None, np.zeros(z.shape[1]), None
    for t in range(len(z)):
        if missing[t].any():
            imputed = conditional_mean(z[t], missing[t], calibration_z)
            if forecast is not None:
                weight = GAP_DECAY ** (gap + 1)
                imputed = np.where(missing[t], weight * forecast + (1 - weight) * imputed, imputed)
            z[t] = imputed
        gap = np.where(missing[t], gap + 1, 0)
        with torch.no_grad():
            x = torch.from_numpy(z[t : t + 1])[None]
            hidden, state = model.lstm(x.clamp(-3, 3), state)
            forecast = (model.ar * x[0, 0] + model.head(hidden[0, 0])).numpy().astype(np.float64)
        out.append(forecast)
    return z, np.stack(out[:-1]).astype(np.float32)


def ewma(values: np.ndarray, alpha: float, observed: np.ndarray) -> np.ndarray:
    state, out = np.zeros(values.shape[1]), []
    for t in range(len(values)):
        state = np.where(observed[t], alpha * values[t] + (1 - alpha) * state, state)
        out.append(state)
    return np.stack(out)


def oracle(artifact: ModelArtifact, raw: np.ndarray, n: int = CALIBRATION) -> np.ndarray:
    """The head rows of every event, computed over the whole sequence at once."""
    post, model = artifact.post_processing, artifact.forecaster()
    observed = ~np.isnan(raw)
    baseline = fit_baseline(forward_fill(raw[:n]))
    z, forecast = forecasts(model, np.nan_to_num((raw - baseline.median) / baseline.scale).astype(np.float32),
                            ~observed, np.nan_to_num((forward_fill(raw[:n]) - baseline.median) / baseline.scale))
    contributions = np.zeros_like(z, dtype=np.float64)
    contributions[1:] = ((z[1:] - forecast) / model.residual_scale.numpy()) ** 2
    skip = warm_up_events(n)
    capped = np.minimum(contributions / np.maximum(contributions[skip:n].mean(axis=0), post.floor), post.cap)
    residual = ewma(capped, post.alpha, observed)
    level = max(np.quantile((residual * observed).max(axis=1)[skip:n], post.quantile), 1e-6)
    smoothed_z = ewma(z.astype(np.float64), post.level_alpha, observed)
    beyond = np.maximum(np.abs(smoothed_z) / model.level_scale.numpy() - post.level_deadband, 0)
    evidence = (residual + level * np.minimum(beyond**2, post.cap)) * observed
    rows = np.concatenate([evidence, observed, np.full((len(raw), 1), level)], axis=1)
    rows[: n - 1] = np.concatenate([np.zeros_like(evidence[: n - 1]), observed[: n - 1],
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


def scores_of(artifact: ModelArtifact, raw: np.ndarray, post: PostProcessing | None = None) -> np.ndarray:
    rows, _ = stream(detector(artifact, post=post), raw)
    with torch.no_grad():
        return artifact.head()(torch.from_numpy(rows)).numpy()


def test_a_held_step_on_a_reading_forecast_by_its_last_value_alarms_through_the_level_statistic(artifact):
    """The residual statistic sees such a step for one event; the level statistic for as long as it lasts."""
    temp = artifact.features.index("temp")
    assert artifact.forecaster().ar[temp] > 0.9  # the model forecasts temp by its last value
    raw = readings(9, missing=0.0)
    raw[:, 0] -= np.where(np.arange(len(raw)) >= 150, 0.5, 0.0)  # no pressure step: only the temp step below
    sigma = np.std(raw[:CALIBRATION, temp])
    # 25 sigma: the training devices' temp wanders 3.6 calibration sigmas (its level scale), and the level
    # statistic alarms beyond (dead band 4 + 1.2) level scales
    assert 3.0 < artifact.forecaster().level_scale[temp] < 4.0
    raw[100:, temp] += 25 * sigma
    residual_only = scores_of(artifact, raw, replace(artifact.post_processing, level_deadband=np.inf))
    both = scores_of(artifact, raw)
    threshold = artifact.threshold
    assert np.mean(residual_only[110:, 0] > threshold) < 0.1
    assert np.all(both[160:, 0] > threshold)
    np.testing.assert_allclose(both[CALIBRATION:, 1:].sum(axis=1), 1.0, atol=1e-5)  # shares of E = R + level·L
    assert np.all(both[160:, 1 + temp] > 0.5)  # the level evidence is temp's, and its contribution shows it


def test_a_missing_burst_does_not_raise_the_evidence_of_the_readings_still_present(artifact):
    raw = readings(10, missing=0.0)
    gapped = raw.copy()
    gapped[80:140, 1] = np.nan  # rpm, which the others are forecast with, is absent for 60 events
    clean_rows, _ = stream(detector(artifact), raw)
    gap_rows, _ = stream(detector(artifact), gapped)
    present = [0, 2]
    assert np.max(gap_rows[80:150, present]) < 1.5 * np.max(clean_rows[80:150, present]) + 0.1
    assert np.all(gap_rows[80:140, 1] == 0.0)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-1", "one-value-per-slot"])
def test_a_state_pickled_before_the_level_statistic_still_loads(artifact, packed):
    raw = readings(11)
    d = detector(artifact)
    state = d.new_state()
    for values in raw[:CALIBRATION + 5]:
        d.update(state, values)
    n = len(state.weights)
    if packed:
        floats = np.concatenate([np.zeros(n), state.weights, state.evidence, state.forecast, state.baseline.median,
                                 state.baseline.scale]).tobytes()
        old = ("packed-1", state.events_seen, state.level, n, None, True, True, floats,
               np.concatenate([state.h, state.c]).tobytes())
    else:
        old = (state.events_seen, None, state.baseline, np.zeros(n), state.h, state.c, state.forecast, state.weights,
               state.level, state.evidence)
    loaded = DetectorState.__new__(DetectorState)
    loaded.__setstate__(old)
    np.testing.assert_array_equal(loaded.evidence, state.evidence)
    np.testing.assert_array_equal(loaded.mean, np.zeros(n))
    row, calibrating = d.update(loaded, raw[CALIBRATION + 5])
    assert not calibrating and np.all(np.isfinite(row))
