"""The offline scorer (models/offline.py) gives the job's scores: the same as DeviceLogic and the head."""

from __future__ import annotations

import numpy as np
import torch

from models.offline import score_device
from models.train import train
from tests.test_artifact import write_recording
from tests.test_detector import CALIBRATION, readings
from transforms.device_state import DeviceLogic


def test_offline_scores_equal_the_per_device_logic_and_head_of_the_job(tmp_path):
    artifact = train([write_recording(tmp_path / "line.avro")], tmp_path / "model", epochs=5, seed=3, hidden_size=8,
                     calibration_events=CALIBRATION)
    raw = readings(12)
    offline = score_device(artifact.detector(CALIBRATION), raw, artifact.head())
    logic, state, rows, calibrating = DeviceLogic.for_artifact(artifact, 2**62, CALIBRATION), None, [], []
    for t, values in enumerate(raw):
        event = {name: None if np.isnan(v) else float(v) for name, v in zip(artifact.features, values)}
        step = logic.on_event(state, 1_700_000_000_000 + 1000 * t, event, "p0")
        state = step.state
        rows.append(step.model_input)
        calibrating.append(step.calibrating)
    with torch.no_grad():
        job = artifact.head()(torch.from_numpy(np.stack(rows))).numpy()
    np.testing.assert_array_equal(offline.scores, job[:, 0].astype(np.float64))
    np.testing.assert_array_equal(offline.contributions, job[:, 1:])
    np.testing.assert_array_equal(offline.calibrating, calibrating)
    assert np.any(offline.scores > artifact.threshold)  # the 10-sigma step of readings() alarms
