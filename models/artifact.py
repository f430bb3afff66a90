"""The versioned model artifact: a folder the trainer writes and the job loads.

Layout::

    model.json       features and their order, post-processing and threshold
                     policy, version, training fingerprint, sha256 of each
                     weights file
    forecaster.pt    state_dict of LstmForecaster (its AR(1) coefficients,
                     residual scales and level scales are buffers)
    head.pt          state_dict of ScoringHead (it has no weights today; kept
                     so a head with weights needs no format change)
    MODEL_CARD.md    what data, which metrics, for people

Normalisation is not in the artifact: every device fits its own baseline
during calibration (see models/detector.py).

Loading checks everything up front, so a wrong or corrupt artifact stops the
job at launch with a message that names the problem, not mid-stream; the
weights are then held in memory, so rewriting the folder later (a hot swap,
see models/serving.py) cannot change a model already in use.

Where a model folder is named (``--model_dir``), it may be the artifact
folder itself, a symlink to one, a *registry* folder whose newest artifact
subfolder serves, or ``bundled``: the model shipped inside this package,
resolved on whichever machine loads it (a launcher's path would not exist on
Flink workers).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.detector import DeviceDetector, PostProcessing
from models.lstm import LstmForecaster, RecurrentStep, ScoringHead, quantize_int8

FORMAT_VERSION = 3  # 3: the forecaster carries level_scale (the level statistic)
QUANTIZE_CHOICES = ("none", "int8")
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED = "bundled"
_SPEC = "model.json"
_FORECASTER = "forecaster.pt"
_HEAD = "head.pt"
_CARD = "MODEL_CARD.md"
_REQUIRED = ("format_version", "model_version", "features", "hidden_size", "post_processing", "threshold",
             "weights_sha256")


class ModelArtifactError(ValueError):
    """The model folder is missing, incomplete, corrupt or inconsistent."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelArtifact:
    """A loaded and checked model folder, its weights in memory."""

    path: Path
    spec: dict
    forecaster_state: dict = field(repr=False, compare=False)
    head_state: dict = field(repr=False, compare=False)

    @property
    def version(self) -> str:
        return self.spec["model_version"]

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.spec["features"])

    @property
    def hidden_size(self) -> int:
        return int(self.spec["hidden_size"])

    @property
    def threshold(self) -> float:
        return float(self.spec["threshold"]["value"])

    @property
    def post_processing(self) -> PostProcessing:
        return PostProcessing(**self.spec["post_processing"])

    @property
    def state_signature(self) -> str:
        """Equal for artifacts whose detectors build identical per-device state from the same events.

        The forecaster weights, the features and the post-processing; not the
        version label, the threshold or the training notes.
        """
        parts = [self.spec["weights_sha256"][_FORECASTER], self.features, self.hidden_size,
                 sorted(self.spec["post_processing"].items())]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def forecaster(self) -> LstmForecaster:
        model = LstmForecaster(len(self.features), self.hidden_size)
        model.load_state_dict(self.forecaster_state)
        return model.eval()

    def head(self) -> ScoringHead:
        head = ScoringHead()
        head.load_state_dict(self.head_state)
        return head.eval()

    def step(self, quantize: str = "none") -> nn.Module:
        """The forecaster as a one-event RecurrentStep, int8-quantised when asked."""
        step = RecurrentStep(self.forecaster()).eval()
        return quantize_int8(step) if quantize == "int8" else step

    def detector(self, calibration_events: int, quantize: str = "none",
                 post: PostProcessing | None = None) -> DeviceDetector:
        """The per-device detector of this model; `post` replaces the artifact's post-processing (tuning)."""
        forecaster = self.forecaster()
        return DeviceDetector(self.step(quantize), forecaster.residual_scale.numpy(), post or self.post_processing,
                              calibration_events, forecaster.level_scale.numpy())


def resolve_model_dir(path: str | Path) -> Path:
    """The artifact folder `path` names now: itself, `bundled`, or a registry folder's newest artifact.

    A registry's newest artifact is the subfolder whose model.json was
    written last (the trainer writes it after the weights), ties by name.
    """
    if str(path) == BUNDLED:
        return BUNDLED_MODEL_DIR
    folder = Path(path).resolve()
    if (folder / _SPEC).is_file() or not folder.is_dir():
        return folder
    artifacts = [child for child in folder.iterdir() if (child / _SPEC).is_file()]
    if not artifacts:
        return folder
    return max(artifacts, key=lambda child: ((child / _SPEC).stat().st_mtime_ns, child.name))


def load_artifact(path: str | Path) -> ModelArtifact:
    """Loads and checks a model folder (see resolve_model_dir); raises ModelArtifactError naming the problem."""
    folder = resolve_model_dir(path)
    if not (folder / _SPEC).is_file():
        raise ModelArtifactError(f"{folder} is not a model artifact: {_SPEC} is missing, and no subfolder has one")
    try:
        spec = json.loads((folder / _SPEC).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelArtifactError(f"{folder / _SPEC} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ModelArtifactError(f"{folder / _SPEC} is not a JSON object")
    missing = [key for key in _REQUIRED if key not in spec]
    if missing:
        raise ModelArtifactError(f"{folder / _SPEC} lacks {', '.join(missing)}")
    if spec["format_version"] != FORMAT_VERSION:
        raise ModelArtifactError(f"{folder} has format version {spec['format_version']}; this job reads {FORMAT_VERSION}")
    weights = {name: _checked_weights(folder / name, expected) for name, expected in spec["weights_sha256"].items()}
    if set(weights) != {_FORECASTER, _HEAD}:
        raise ModelArtifactError(f"{folder / _SPEC} must list exactly {_FORECASTER} and {_HEAD} in weights_sha256")
    try:
        PostProcessing(**spec["post_processing"])
    except TypeError as e:
        raise ModelArtifactError(f"{folder / _SPEC} has a bad post_processing: {e}") from None
    lacking = sorted({f.name for f in fields(PostProcessing)} - set(spec["post_processing"]))
    if lacking:  # written before the detector had them: its weights were fitted for another design
        raise ModelArtifactError(f"{folder / _SPEC} has a bad post_processing: it lacks {', '.join(lacking)} "
                                 "(an artifact of an earlier detector design; retrain it)")
    artifact = ModelArtifact(folder, spec, weights[_FORECASTER], weights[_HEAD])
    try:
        artifact.forecaster()
        artifact.head()
    except RuntimeError as e:
        raise ModelArtifactError(f"{folder} weights do not fit its model.json: {e}") from None
    return artifact


def _checked_weights(file: Path, expected_sha256: str) -> dict:
    """A state_dict read from the very bytes whose checksum was verified."""
    if not file.is_file():
        raise ModelArtifactError(f"{file} is missing")
    data = file.read_bytes()
    if _sha256(data) != expected_sha256:
        raise ModelArtifactError(f"{file} is corrupt: its sha256 does not match {_SPEC}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as e:
        raise ModelArtifactError(f"{file} is not a torch state_dict: {e}") from None


def save_artifact(folder: Path, model: LstmForecaster, spec: dict[str, Any], model_card: str) -> ModelArtifact:
    """Writes the artifact; `spec` holds everything but format version and checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / _FORECASTER)
    torch.save(ScoringHead().state_dict(), folder / _HEAD)
    full = {"format_version": FORMAT_VERSION, **spec,
            "weights_sha256": {name: _sha256((folder / name).read_bytes()) for name in (_FORECASTER, _HEAD)}}
    (folder / _SPEC).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / _CARD).write_text(model_card, encoding="utf-8")
    return load_artifact(folder)
