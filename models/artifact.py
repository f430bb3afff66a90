"""The versioned model artifact: a folder the trainer writes and the job loads.

Layout::

    model.json       features, normalisation, threshold policy, version,
                     training fingerprint, sha256 of each weights file
    forecaster.pt    state_dict of LstmForecaster (recurrence + head)
    head.pt          state_dict of ScoringHead, what RunInference loads
    MODEL_CARD.md    what data, which metrics, for people

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

from models.lstm import LstmForecaster, NumpyLstmCell, ScoringHead

FORMAT_VERSION = 1
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "bundled"
_SPEC = "model.json"
_FORECASTER = "forecaster.pt"
_HEAD = "head.pt"
_CARD = "MODEL_CARD.md"
_REQUIRED = ("format_version", "model_version", "features", "hidden_size", "reference_mean", "reference_std",
             "residual_scale", "threshold", "weights_sha256")


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
    def reference_mean(self) -> np.ndarray:
        return np.asarray(self.spec["reference_mean"], dtype=np.float64)

    @property
    def reference_std(self) -> np.ndarray:
        return np.asarray(self.spec["reference_std"], dtype=np.float64)

    @property
    def head_path(self) -> str:
        return str(self.path / _HEAD)

    def head_params(self) -> dict[str, int]:
        """Constructor arguments of ScoringHead, for the PyTorch model handler."""
        return {"n_features": len(self.features), "hidden_size": self.hidden_size}

    def forecaster(self) -> LstmForecaster:
        model = LstmForecaster(len(self.features), self.hidden_size)
        model.load_state_dict(torch.load(self.path / _FORECASTER, map_location="cpu", weights_only=True))
        return model.eval()

    def head(self) -> ScoringHead:
        head = ScoringHead(**self.head_params())
        head.load_state_dict(torch.load(self.path / _HEAD, map_location="cpu", weights_only=True))
        return head.eval()

    def lstm_cell(self) -> NumpyLstmCell:
        return NumpyLstmCell(self.forecaster().lstm)


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
    n = len(spec["features"])
    for key in ("reference_mean", "reference_std", "residual_scale"):
        if len(spec[key]) != n:
            raise ModelArtifactError(f"{key} has {len(spec[key])} values for {n} features")
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
    head = ScoringHead(model.n_features, model.hidden_size)
    head.head.load_state_dict(model.head.state_dict())
    head.residual_scale.copy_(torch.as_tensor(spec["residual_scale"], dtype=torch.float32))
    torch.save(head.state_dict(), folder / _HEAD)
    full = {"format_version": FORMAT_VERSION, **spec,
            "weights_sha256": {name: _sha256(folder / name) for name in (_FORECASTER, _HEAD)}}
    (folder / _SPEC).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / _CARD).write_text(model_card, encoding="utf-8")
    return load_artifact(folder)
