"""The training reference that live drift statistics are compared with.

    python -m models.drift_reference --model_dir DIR --input FILE.avro [FILE.avro ...]
    python -m models.drift_reference --model_dir models/bundled --simulate

It is saved as ``drift_reference.json`` in the model artifact folder. For each
reading, and for ``__score__`` (the model's scores on its training data after
calibration), it keeps the pooled mean and std, the decile bins the PSI is
computed on (edges and training shares) and the percentile edges with the
training CDF the KS statistic is computed on. Live windows only count values
into these fixed bins, so their summaries are small and mergeable.

Training writes the reference itself; this command writes it for an existing
artifact from a recording (Avro container files of SensorEvent) or from the
built-in simulator (what the bundled model was trained on).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from models.artifact import ModelArtifact, load_artifact, resolve_model_dir
from models.preprocessing import readings_vector

REFERENCE_FILE = "drift_reference.json"
SCORE_FEATURE = "__score__"
PSI_QUANTILES = np.linspace(0.0, 1.0, 11)[1:-1]  # deciles: the usual PSI binning
KS_QUANTILES = np.linspace(0.0, 1.0, 101)[1:-1]  # percentiles: the CDF is checked at 99 points
MIN_VALUES = 2

_LOG = logging.getLogger("models.drift_reference")


@dataclass(frozen=True)
class FeatureReference:
    """One feature's training distribution, reduced to what the live statistics need.

    Bin ``i`` holds ``edges[i-1] <= x < edges[i]`` (``np.searchsorted(edges, x, "right")``);
    ``ks_cdf[i]`` is the training share below ``ks_edges[i]``.
    """

    count: int
    mean: float
    std: float
    psi_edges: tuple[float, ...]
    psi_proportions: tuple[float, ...]
    ks_edges: tuple[float, ...]
    ks_cdf: tuple[float, ...]


@dataclass(frozen=True)
class DriftReference:
    model_version: str
    features: dict[str, FeatureReference]


def bin_index(edges: Sequence[float], values: np.ndarray) -> np.ndarray:
    """The bin of each value; len(edges) + 1 bins, open at both ends."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")


def feature_reference(values: np.ndarray) -> FeatureReference:
    """The reference of one feature from its training values (NaN = missing)."""
    values = values[~np.isnan(values)]
    psi_edges = np.unique(np.quantile(values, PSI_QUANTILES))
    ks_edges = np.unique(np.quantile(values, KS_QUANTILES))
    psi_counts = np.bincount(bin_index(psi_edges, values), minlength=len(psi_edges) + 1)
    ks_counts = np.bincount(bin_index(ks_edges, values), minlength=len(ks_edges) + 1)
    return FeatureReference(
        count=int(len(values)),
        mean=float(np.mean(values)),
        std=float(np.std(values)),
        psi_edges=tuple(psi_edges.tolist()),
        psi_proportions=tuple((psi_counts / len(values)).tolist()),
        ks_edges=tuple(ks_edges.tolist()),
        ks_cdf=tuple((np.cumsum(ks_counts)[:-1] / len(values)).tolist()),
    )


def build_reference(model_version: str, features: Sequence[str], raw: np.ndarray,
                    scores: np.ndarray) -> DriftReference:
    """From the pooled training readings (events x features, NaN = missing) and training scores."""
    columns = {name: raw[:, i] for i, name in enumerate(features)}
    columns[SCORE_FEATURE] = np.asarray(scores, dtype=np.float64)
    usable = {name: v for name, v in columns.items() if np.count_nonzero(~np.isnan(v)) >= MIN_VALUES}
    return DriftReference(model_version, {name: feature_reference(v) for name, v in usable.items()})


def save_reference(folder: Path, reference: DriftReference) -> Path:
    path = Path(folder) / REFERENCE_FILE
    path.write_text(json.dumps(asdict(reference), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_reference(folder: str | Path) -> DriftReference | None:
    """The artifact's reference, or None for artifacts written before drift statistics existed."""
    path = resolve_model_dir(folder) / REFERENCE_FILE
    if not path.is_file():
        return None
    spec = json.loads(path.read_text(encoding="utf-8"))
    features = {name: FeatureReference(**{k: tuple(v) if isinstance(v, list) else v for k, v in ref.items()})
                for name, ref in spec["features"].items()}
    return DriftReference(spec["model_version"], features)


def replay_scores(artifact: ModelArtifact, sequences: Mapping[str, Sequence[dict]], calibration_events: int,
                  batch_size: int = 4096) -> np.ndarray:
    """The scores the job gives each device's events after calibration, in the job's own code path."""
    from transforms.device_state import DeviceLogic  # the job's per-device logic; imported late (it imports Beam)

    logic = DeviceLogic.for_artifact(artifact, state_ttl_ms=2**62, calibration_events=calibration_events)
    inputs = []
    for events in sequences.values():
        state = None
        for event in events:
            step = logic.on_event(state, event["event_time"], event["readings"], "reference")
            state = step.state
            if not step.calibrating:
                inputs.append(step.model_input)
    if not inputs:
        return np.zeros(0)
    head = artifact.head()
    stacked = torch.as_tensor(np.stack(inputs), dtype=torch.float32)
    with torch.no_grad():
        return torch.cat([head(batch)[:, 0] for batch in stacked.split(batch_size)]).numpy().astype(np.float64)


def reference_from_events(artifact: ModelArtifact, sequences: Mapping[str, Sequence[dict]],
                          calibration_events: int) -> DriftReference:
    """The reference of an existing artifact from SensorEvent records grouped per device, in time order."""
    raw = np.stack([readings_vector(e["readings"], artifact.features) for events in sequences.values() for e in events])
    scores = replay_scores(artifact, sequences, calibration_events)
    return build_reference(artifact.version, artifact.features, raw, scores)


def _simulated_sequences(devices: int, events_per_device: int, seed: int) -> dict[str, list[dict]]:
    """The fault-free simulated line the bundled model is trained on, per device."""
    from beam_jobs.simulator import LineSimulator, SimulatorConfig

    simulator = LineSimulator(SimulatorConfig(devices=devices, seed=seed, fault_rate_per_hour=0.0))
    per_device: dict[str, list[dict]] = {}
    for event, _ in simulator.take(devices * events_per_device):
        per_device.setdefault(event["device_id"], []).append(event)
    return per_device


def _recorded_sequences(paths: Iterable[Path]) -> dict[str, list[dict]]:
    from models.train import read_device_sequences

    return read_device_sequences(list(paths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.drift_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, type=Path, help="model artifact folder to write the reference to")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", type=Path, help="Avro container files of SensorEvent (the training data)")
    source.add_argument("--simulate", action="store_true", help="use the fault-free simulated line instead")
    parser.add_argument("--devices", type=int, default=20, help="simulated machines (default 20, as models.bundle)")
    parser.add_argument("--events_per_device", type=int, default=1500, help="simulated steps (default 1500)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (default 7, as models.bundle)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    artifact = load_artifact(args.model_dir)
    calibration = int(artifact.spec.get("training", {}).get("calibration_events", 60))
    sequences = (_simulated_sequences(args.devices, args.events_per_device, args.seed) if args.simulate
                 else _recorded_sequences(args.input))
    path = save_reference(args.model_dir, reference_from_events(artifact, sequences, calibration))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
