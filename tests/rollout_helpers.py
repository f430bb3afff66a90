"""Model artifacts for rollout tests: copies of the bundled model, re-labelled or re-tuned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from models.artifact import BUNDLED_MODEL_DIR


def model_variant(folder: Path, version: str, **post_processing: float) -> Path:
    """The bundled model under another version; post-processing changes make it a different model.

    Same weights and post-processing: the same state signature (device state
    carries over). Different post-processing: another signature (devices
    recalibrate).
    """
    shutil.copytree(BUNDLED_MODEL_DIR, folder)
    spec_path = folder / "model.json"
    spec = json.loads(spec_path.read_text())
    spec["model_version"] = version
    spec["post_processing"].update(post_processing)
    spec_path.write_text(json.dumps(spec, indent=2))
    return folder
