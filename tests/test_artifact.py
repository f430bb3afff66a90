"""Tests of models.artifact with real trained models: reproducible and checked on load.

A tiny model is trained by models.train on a synthetic recording. Streaming
equals batch is tested in test_detector.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastavro
import numpy as np
import pytest
import torch

from models.artifact import FORMAT_VERSION, ModelArtifactError, load_artifact
from models.detector import PostProcessing
from models.train import fingerprint, read_device_sequences, train
from schemas.serde import EVENT, current_schema

DEVICES, EVENTS_PER_DEVICE, EPOCHS, HIDDEN, CALIBRATION = 3, 200, 2, 8, 50
FEATURES = ("pressure", "rpm", "temp")

def write_recording(path: Path) -> Path:
    rng = np.random.default_rng(11)
    records = []
    for d in range(DEVICES):
        for i in range(EVENTS_PER_DEVICE):
            readings = {"temp": 20 + d + np.sin(i / 10) + rng.normal(0, 0.1), "rpm": 1500 + 30 * np.cos(i / 7),
                        "pressure": None if rng.random() < 0.1 else 3.0 + rng.normal(0, 0.05)}
            records.append({"event_id": f"d{d}-{i}", "device_id": f"press-{d}",
                            "event_time": 1_700_000_000_000 + i * 1000,
                            "readings": {k: None if v is None else float(v) for k, v in readings.items()}})
    rng.shuffle(records)  # training must order each device by event time itself
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(current_schema(EVENT)), records)
    return path

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The recording and two models trained on it with the same seed."""
    root = tmp_path_factory.mktemp("artifact")
    recording = write_recording(root / "line.avro")
    for name in ("first", "second"):
        train([recording], root / name, epochs=EPOCHS, seed=5, hidden_size=HIDDEN, calibration_events=CALIBRATION)
    return recording, root / "first", root / "second"

@pytest.fixture
def model_dir(trained, tmp_path) -> Path:
    """A private copy of a trained artifact that a test may damage."""
    return Path(shutil.copytree(trained[1], tmp_path / "model"))

def _spec(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())

def _write_spec(folder: Path, spec: dict) -> None:
    (folder / "model.json").write_text(json.dumps(spec))

@pytest.mark.parametrize("name", ["forecaster.pt", "head.pt", "model.json", "MODEL_CARD.md"])
def test_same_seed_and_data_give_byte_identical_artifacts(trained, name):
    _, first, second = trained
    assert (first / name).read_bytes() == (second / name).read_bytes()

def test_the_fingerprint_is_of_the_events_not_the_file_bytes(trained, tmp_path):
    recording, first, _ = trained
    with open(recording, "rb") as f:
        events = list(fastavro.reader(f))
    rewritten = tmp_path / "again.avro"
    with open(rewritten, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(current_schema(EVENT)), events[::-1])
    assert rewritten.read_bytes() != recording.read_bytes()
    assert fingerprint(read_device_sequences([rewritten])) == _spec(first)["training"]["fingerprint_sha256"]


def test_another_seed_gives_other_weights(trained, tmp_path):
    recording, first, _ = trained
    other = train([recording], tmp_path / "other", epochs=EPOCHS, seed=6, hidden_size=HIDDEN,
                  calibration_events=CALIBRATION)
    assert (other.path / "forecaster.pt").read_bytes() != (first / "forecaster.pt").read_bytes()
    assert other.version != load_artifact(first).version

def test_load_artifact_round_trips_what_training_wrote(trained):
    recording, first, _ = trained
    artifact = load_artifact(first)
    spec = _spec(first)
    assert artifact.features == FEATURES
    assert artifact.version == spec["model_version"] and artifact.version.startswith(f"lstm-h{HIDDEN}-")
    assert artifact.version.endswith("-s5")
    assert artifact.hidden_size == HIDDEN
    assert artifact.threshold == spec["threshold"]["value"] == PostProcessing().factor
    assert artifact.post_processing == PostProcessing()
    assert spec["format_version"] == FORMAT_VERSION
    training = spec["training"]
    assert training["events"] == DEVICES * EVENTS_PER_DEVICE and training["devices"] == DEVICES
    assert training["files"] == [recording.name] and training["calibration_events"] == CALIBRATION
    assert artifact.head()(torch.zeros(2, 2 * len(FEATURES) + 1)).shape == (2, 1 + len(FEATURES))
    model = artifact.forecaster()
    assert torch.all((model.ar >= 0) & (model.ar <= 1)) and torch.all(model.residual_scale > 0)
    assert artifact.version in (first / "MODEL_CARD.md").read_text()

@pytest.mark.parametrize("name", ["forecaster.pt", "head.pt"])
def test_a_flipped_byte_in_the_weights_is_reported_as_corrupt(model_dir, name):
    data = bytearray((model_dir / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_dir / name).write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match=f"{name} is corrupt"):
        load_artifact(model_dir)

def test_missing_weights_are_reported(model_dir):
    (model_dir / "head.pt").unlink()
    with pytest.raises(ModelArtifactError, match="head.pt is missing"):
        load_artifact(model_dir)

def test_missing_model_json_is_reported(model_dir, tmp_path):
    (model_dir / "model.json").unlink()
    with pytest.raises(ModelArtifactError, match="is not a model artifact: model.json is missing"):
        load_artifact(model_dir)
    with pytest.raises(ModelArtifactError, match="is not a model artifact"):
        load_artifact(tmp_path / "no-such-folder")

@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"], ids=["broken", "empty", "not-utf8"])
def test_model_json_that_is_not_json_is_reported(model_dir, text):
    (model_dir / "model.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelArtifactError, match="model.json is not valid JSON"):
        load_artifact(model_dir)

@pytest.mark.parametrize("version", [2, 4, "3"])
def test_another_format_version_is_refused(model_dir, version):
    _write_spec(model_dir, {**_spec(model_dir), "format_version": version})
    with pytest.raises(ModelArtifactError, match=f"has format version {version}; this job reads {FORMAT_VERSION}"):
        load_artifact(model_dir)

@pytest.mark.parametrize("keys", [("threshold",), ("features", "weights_sha256")])
def test_missing_keys_are_named(model_dir, keys):
    _write_spec(model_dir, {k: v for k, v in _spec(model_dir).items() if k not in keys})
    with pytest.raises(ModelArtifactError, match="lacks " + ", ".join(keys)):
        load_artifact(model_dir)

def test_a_bad_post_processing_is_refused(model_dir):
    _write_spec(model_dir, {**_spec(model_dir), "post_processing": {"ewma_spam": 45}})
    with pytest.raises(ModelArtifactError, match="bad post_processing"):
        load_artifact(model_dir)

def test_weights_that_do_not_fit_the_spec_are_refused(model_dir):
    _write_spec(model_dir, {**_spec(model_dir), "hidden_size": HIDDEN * 2})
    with pytest.raises(ModelArtifactError, match="weights do not fit its model.json"):
        load_artifact(model_dir)
