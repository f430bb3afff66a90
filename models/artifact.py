"""The versioned model artifact: a folder the trainer writes and the job loads.

Layout::

    model.json       features and their order, post-processing and threshold
                     policy, version, training fingerprint, sha256 of each
                     weights file
    forecaster.pt    state_dict of LstmForecaster (its AR(1) coefficients and
                     residual scales are buffers)
    head.pt          state_dict of ScoringHead, what RunInference loads
    MODEL_CARD.md    what data, which metrics, for people

Normalisation is not in the artifact: every device fits its own baseline
during calibration (see models/detector.py).

Loading checks everything up front, so a wrong or corrupt artifact stops the
job at launch with a message that names the problem, not mid-stream.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torch import nn

from models.detector import PostProcessing
from models.lstm import LstmForecaster, RecurrentStep, ScoringHead, quantize_int8

FORMAT_VERSION = 2
QUANTIZE_CHOICES = ("none", "int8")
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "bundled"
_SPEC = "model.json"
_FORECASTER = "forecaster.pt"
_HEAD = "head.pt"
_CARD = "MODEL_CARD.md"
_REQUIRED = ("format_version", "model_version", "features", "hidden_size", "post_processing", "threshold",
             "weights_sha256")


class ModelArtifactError(ValueError):
    """The model folder is missing, incomplete, corrupt or inconsistent."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class ModelArtifact:
    """A loaded and checked model folder."""

    path: Path
    spec: dict

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
    def head_path(self) -> str:
        return str(self.path / _HEAD)

    def head_params(self) -> dict[str, int]:
        """Constructor arguments of ScoringHead, for the PyTorch model handler."""
        return {"n_features": len(self.features)}

    def forecaster(self) -> LstmForecaster:
        model = LstmForecaster(len(self.features), self.hidden_size)
        model.load_state_dict(torch.load(self.path / _FORECASTER, map_location="cpu", weights_only=True))
        return model.eval()

    def head(self) -> ScoringHead:
        head = ScoringHead(**self.head_params())
        head.load_state_dict(torch.load(self.path / _HEAD, map_location="cpu", weights_only=True))
        return head.eval()

    def step(self, quantize: str = "none") -> nn.Module:
        """The forecaster as a one-event RecurrentStep, int8-quantised when asked."""
        step = RecurrentStep(self.forecaster()).eval()
        return quantize_int8(step) if quantize == "int8" else step


def load_artifact(path: str | Path) -> ModelArtifact:
    """Loads and checks a model folder; raises ModelArtifactError naming the problem."""
    folder = Path(path)
    if not (folder / _SPEC).is_file():
        raise ModelArtifactError(f"{folder} is not a model artifact: {_SPEC} is missing")
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
    for name, expected in spec["weights_sha256"].items():
        file = folder / name
        if not file.is_file():
            raise ModelArtifactError(f"{file} is missing")
        if _sha256(file) != expected:
            raise ModelArtifactError(f"{file} is corrupt: its sha256 does not match {_SPEC}")
    try:
        PostProcessing(**spec["post_processing"])
    except TypeError as e:
        raise ModelArtifactError(f"{folder / _SPEC} has a bad post_processing: {e}") from None
    artifact = ModelArtifact(folder.resolve(), spec)
    try:
        artifact.forecaster()
        artifact.head()
    except RuntimeError as e:
        raise ModelArtifactError(f"{folder} weights do not fit its model.json: {e}") from None
    return artifact


@functools.lru_cache(maxsize=8)
def cached_artifact(path: str) -> ModelArtifact:
    """One load per worker process and path: DoFns share it."""
    return load_artifact(path)


def save_artifact(folder: Path, model: LstmForecaster, spec: dict[str, Any], model_card: str) -> ModelArtifact:
    """Writes the artifact; `spec` holds everything but format version and checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / _FORECASTER)
    torch.save(ScoringHead(len(spec["features"])).state_dict(), folder / _HEAD)
    full = {"format_version": FORMAT_VERSION, **spec,
            "weights_sha256": {name: _sha256(folder / name) for name in (_FORECASTER, _HEAD)}}
    (folder / _SPEC).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / _CARD).write_text(model_card, encoding="utf-8")
    return load_artifact(folder)
