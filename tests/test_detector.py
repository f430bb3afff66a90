"""The per-device detector against a batch oracle: streaming one event at a time equals the whole sequence.

The oracle runs the trained LstmForecaster's torch LSTM (not the numpy cell
the detector steps) over the recording, imputing missing readings with
numpy's own conditional-mean algebra blended with the forecast; without
missing readings that is one full-sequence call. It applies the
post-processing (residual, level and stuck evidence) with numpy over the
whole sequence, the level's reference by a loop; the DeviceDetector gets the
same readings one event at a time (calibration buffer, replay, eager
forecasts).
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
from models.detector import (GAP_DECAY, STUCK_MULTIPLE, DetectorState, DeviceDetector, PostProcessing, ewma_alpha,
                             warm_up_events)
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
    """The head rows of every event: residual, level and repeats over the whole sequence, the reference by a loop.

    The reference is the one sequential part that numpy cannot vectorise: it
    holds while its reading's evidence is above the threshold.
    """
    post, model = artifact.post_processing, artifact.forecaster()
    observed = ~np.isnan(raw)
    baseline = fit_baseline(forward_fill(raw[:n]))
    z, forecast = forecasts(model, np.nan_to_num((raw - baseline.median) / baseline.scale).astype(np.float32),
                            ~observed, np.nan_to_num((forward_fill(raw[:n]) - baseline.median) / baseline.scale))
    residual = np.zeros_like(z, dtype=np.float64)
    residual[1:] = (z[1:] - forecast) / model.residual_scale.numpy()
    follow_rate, centre_rate = ewma_alpha(post.level_reference_span), ewma_alpha(post.residual_centre_span)
    centre = np.vstack([np.zeros((1, z.shape[1])), ewma(residual, centre_rate, observed)[:-1]])
    squared = (residual - centre) ** 2
    skip = warm_up_events(n)
    capped = np.minimum(squared / np.maximum(squared[skip:n].mean(axis=0), post.floor), post.cap)
    smoothed = ewma(capped, post.alpha, observed)
    level = max(np.quantile((smoothed * observed).max(axis=1)[skip:n], post.quantile), 1e-6)
    mean = ewma(z.astype(np.float64), post.level_alpha, observed)
    repeats = np.zeros_like(mean)
    for t in range(1, len(raw)):
        previous = forward_fill(raw[:t])[-1]
        repeats[t] = np.where(observed[t], np.where(raw[t] == previous, repeats[t - 1] + 1, 0), repeats[t - 1])
    stuck = np.minimum((repeats / (STUCK_MULTIPLE * (repeats[:n].max(axis=0) + post.stuck_margin))) ** 2, post.cap)
    evidence, reference, held = np.zeros_like(mean), np.zeros(z.shape[1]), np.zeros(z.shape[1])
    for t in range(len(raw)):
        if t < n:  # calibration: the reference follows
            reference = np.where(observed[t], reference + follow_rate * (mean[t] - reference), reference)
        beyond = np.maximum(np.abs(mean[t] - reference) / model.level_scale.numpy() - post.level_deadband, 0)
        evidence[t] = (post.residual_weight * smoothed[t] + level * (np.minimum(beyond**2, post.cap) + stuck[t]))
        if t >= n:
            alarming = observed[t] & (evidence[t] > post.factor * level)
            held = np.where(alarming, held + 1, np.where(observed[t], 0, held))
            follow = observed[t] & ~(alarming & (held <= post.level_hold))
            reference = np.where(follow, reference + follow_rate * (mean[t] - reference), reference)
    rows = np.concatenate([evidence * observed, observed, np.full((len(raw), 1), level)], axis=1)
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
    # 8 level scales (s_j, how far the training devices' temp wanders after a calibration): the level statistic
    # alarms beyond 1.2 level scales, and its reference holds while it alarms, so the alarm lasts as the step does
    raw[100:, temp] += 8 * float(artifact.forecaster().level_scale[temp]) * sigma
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


def test_a_packed_state_of_the_detector_before_the_reference_still_loads(artifact):
    raw = readings(12)
    d = detector(artifact)
    state = d.new_state()
    for values in raw[:CALIBRATION + 5]:
        d.update(state, values)
    floats = np.concatenate([state.weights, state.evidence, state.mean, state.gap, state.forecast,
                             state.baseline.median, state.baseline.scale, state.imputer.centre,
                             state.imputer.covariance.ravel()]).tobytes()
    old = ("packed-2", state.events_seen, state.level, len(state.weights), None, True, True, floats,
           np.concatenate([state.h, state.c]).tobytes())
    loaded = DetectorState.__new__(DetectorState)
    loaded.__setstate__(old)
    np.testing.assert_array_equal(loaded.mean, state.mean)
    np.testing.assert_array_equal(loaded.reference, np.zeros(len(state.weights)))
    row, calibrating = d.update(loaded, raw[CALIBRATION + 5])
    assert not calibrating and np.all(np.isfinite(row))


def test_a_stuck_reading_alarms_and_a_coarsely_quantised_one_does_not(artifact):
    """A reading that repeats its value alarms once the repeat is well past the longest of its calibration; a
    reading quantised so coarsely that it repeats all the time gets a limit of its own; a gap neither extends nor
    ends a repeat."""
    raw = readings(13, steps=150, missing=0.0)
    raw[:, 0] = np.round(raw[:, 0], 1)  # std 0.05 on a 0.1 grid: runs of equal values throughout
    quantised = scores_of(artifact, raw)
    assert np.mean(quantised[CALIBRATION:, 0] > artifact.threshold) < 0.05
    stuck = raw.copy()
    stuck[90:, 2] = stuck[90, 2]  # temp sticks
    stuck[120:125, 2] = np.nan  # and drops out for a moment
    scores = scores_of(artifact, stuck)
    d = detector(artifact)
    state = d.new_state()
    for values in stuck[:125]:
        d.update(state, values)
    assert state.repeats[2] == 119 - 90
    assert np.all(scores[110:120, 0] > artifact.threshold) and np.all(scores[125:, 0] > artifact.threshold)
    assert np.all(scores[125:, 1 + 2] > 0.5)  # temp's contribution carries it


def test_a_step_alarms_for_the_hold_and_a_slow_drift_is_absorbed(artifact):
    """The level's reference holds for level_hold events of an alarm, so a step keeps alarming that long, then
    follows (a new operating point does not alarm for ever); it follows a drift slower than its span, so that does
    not alarm."""
    post = artifact.post_processing
    raw = readings(14, steps=200 + post.level_hold + 3 * post.level_reference_span, missing=0.0)
    raw[150:, 0] -= 0.5  # readings() adds a pressure step at 150; not here
    sigma = np.std(raw[:CALIBRATION, 0])
    scale = float(artifact.forecaster().level_scale[0])
    stepped, drifted = raw.copy(), raw.copy()
    stepped[200:, 0] += 5 * scale * sigma
    drifted[:, 0] += np.linspace(0, 3 * scale * sigma, len(raw))
    scores = scores_of(artifact, stepped)[:, 0]
    assert np.all(scores[260:200 + post.level_hold] > artifact.threshold)
    assert np.all(scores[-post.level_reference_span // 2:] < artifact.threshold)
    assert np.mean(scores_of(artifact, drifted)[CALIBRATION:, 0] > artifact.threshold) < 0.02
