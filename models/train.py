"""Trains the LSTM forecaster on recorded SensorEvent streams and writes an artifact.

    python -m models.train --input FILE.avro [FILE.avro ...] --output_dir DIR [--epochs N] [--seed S]

Each input is an Avro object-container file of SensorEvent records (what the
record tool writes). Events are grouped per device, ordered by event time and
prepared by the same imputation/normalisation code the streaming job runs.
Training is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import fastavro
import numpy as np
import torch

from models.artifact import ModelArtifact, save_artifact
from models.lstm import LstmForecaster, score_residuals
from models.preprocessing import FeaturePreprocessor, readings_vector

_LOG = logging.getLogger("models.train")
WINDOW = 64
THRESHOLD_QUANTILE = 0.999


def read_device_sequences(paths: Sequence[Path]) -> dict[str, list[dict]]:
    """SensorEvent records per device, in event-time order."""
    per_device: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        with open(path, "rb") as f:
            for record in fastavro.reader(f):
                per_device[record["device_id"]].append(record)
    for events in per_device.values():
        events.sort(key=lambda e: _millis(e["event_time"]))
    return dict(sorted(per_device.items()))


def _millis(value) -> int:
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


def fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the training files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def feature_names(sequences: dict[str, list[dict]]) -> tuple[str, ...]:
    return tuple(sorted({name for events in sequences.values() for e in events for name in e["readings"]}))


def raw_matrix(events: Iterable[dict], features: Sequence[str]) -> np.ndarray:
    return np.stack([readings_vector(e["readings"], features) for e in events])


def within_device_std(raws: Iterable[np.ndarray]) -> np.ndarray:
    """The typical spread of each reading around its own device's mean.

    Devices differ in baseline; the pooled std would mix that difference into
    the scale every device is normalised with before its calibration ends.
    """
    centred = np.concatenate([raw - np.nanmean(raw, axis=0) for raw in raws])
    return np.maximum(np.nanstd(centred, axis=0), 1e-6)


def prepare(raw: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray, calibration_events: int):
    """Inputs and masks of one device, exactly as the streaming job computes them."""
    pre = FeaturePreprocessor(ref_mean, ref_std, calibration_events)
    xs, masks = zip(*(pre.transform(row) for row in raw))
    return np.stack(xs), np.stack(masks)


def _windows(x: np.ndarray, mask: np.ndarray, start: int) -> list[tuple[np.ndarray, np.ndarray]]:
    stride = WINDOW // 2
    return [(x[i : i + WINDOW], mask[i : i + WINDOW]) for i in range(start, max(start + 1, len(x) - WINDOW + 1), stride)
            if len(x[i : i + WINDOW]) == WINDOW]


def fit(model: LstmForecaster, x: torch.Tensor, mask: torch.Tensor, epochs: int, seed: int) -> list[float]:
    """Adam on masked squared forecast error; one loss per epoch, for the card."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for batch in order.split(64):
            forecast = model(x[batch], mask[batch])
            loss = ((forecast - x[batch]) ** 2 * mask[batch]).sum() / mask[batch].sum().clamp(min=1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
        _LOG.info("epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
    return losses


def train(
    paths: Sequence[Path],
    output_dir: Path,
    *,
    epochs: int = 20,
    seed: int = 0,
    hidden_size: int = 32,
    calibration_events: int = 100,
) -> ModelArtifact:
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # the same float sums every run
    sequences = read_device_sequences(paths)
    if not sequences:
        raise ValueError("the input files hold no SensorEvent records")
    features = feature_names(sequences)
    raws = {device: raw_matrix(events, features) for device, events in sequences.items()}
    pooled = np.concatenate(list(raws.values()))
    ref_mean = np.nanmean(pooled, axis=0)
    ref_std = within_device_std(raws.values())
    prepared = {d: prepare(raw, ref_mean, ref_std, calibration_events) for d, raw in raws.items()}
    windows = [w for x, m in prepared.values() for w in _windows(x, m, 0)]
    x = torch.as_tensor(np.stack([w[0] for w in windows]))
    mask = torch.as_tensor(np.stack([w[1] for w in windows]))
    _LOG.info("training on %d devices, %d events, %d windows, features %s", len(raws), len(pooled), len(x), features)
    model = LstmForecaster(len(features), hidden_size)
    losses = fit(model, x, mask, epochs, seed)
    residual_scale, scores = _residual_statistics(model, prepared, calibration_events)
    threshold = float(np.quantile(scores, THRESHOLD_QUANTILE)) if len(scores) else 1.0
    digest = fingerprint(paths)
    spec = {
        "model_version": f"lstm-h{hidden_size}-{digest[:10]}-s{seed}",
        "features": list(features),
        "hidden_size": hidden_size,
        "reference_mean": ref_mean.tolist(),
        "reference_std": ref_std.tolist(),
        "residual_scale": residual_scale.tolist(),
        "threshold": {"policy": f"quantile {THRESHOLD_QUANTILE} of training scores after calibration",
                      "value": threshold},
        "training": {"fingerprint_sha256": digest, "files": [p.name for p in paths], "devices": len(raws),
                     "events": int(len(pooled)), "epochs": epochs, "seed": seed,
                     "calibration_events": calibration_events, "final_loss": losses[-1] if losses else None},
    }
    card = _model_card(spec)
    return save_artifact(output_dir, model, spec, card)


def _residual_statistics(model: LstmForecaster, prepared: dict, calibration_events: int):
    """Per-feature residual std after calibration, and the training scores it gives."""
    residuals, masks, xs, forecasts = [], [], [], []
    with torch.no_grad():
        for x, m in prepared.values():
            xt, mt = torch.as_tensor(x)[None], torch.as_tensor(m)[None]
            f = model(xt, mt)[0, calibration_events:]
            xs.append(xt[0, calibration_events:])
            masks.append(mt[0, calibration_events:])
            forecasts.append(f)
    x, m, f = torch.cat(xs), torch.cat(masks), torch.cat(forecasts)
    if len(x) == 0:
        return np.ones(model.n_features), np.zeros(0)
    err = ((x - f) ** 2 * m).sum(0) / m.sum(0).clamp(min=1)
    scale = err.sqrt().clamp(min=1e-3)
    scores = score_residuals(x, m, f, scale)[:, 0].numpy()
    return scale.numpy(), scores


def _model_card(spec: dict) -> str:
    t = spec["training"]
    return (
        f"# Model card: {spec['model_version']}\n\n"
        "LSTM next-step forecaster; the anomaly score is the mean squared standardised forecast residual "
        "over observed readings; per-feature contributions are each reading's share of it.\n\n"
        f"- Features ({len(spec['features'])}): {', '.join(spec['features'])}\n"
        f"- Hidden size: {spec['hidden_size']}\n"
        f"- Training data: {', '.join(t['files'])} ({t['devices']} devices, {t['events']} events), "
        f"sha256 {t['fingerprint_sha256']}\n"
        f"- Epochs {t['epochs']}, seed {t['seed']}, final training loss {t['final_loss']:.4f}\n"
        f"- Threshold: {spec['threshold']['value']:.4f} ({spec['threshold']['policy']})\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="Avro container files of SensorEvent")
    parser.add_argument("--output_dir", required=True, type=Path, help="folder to write the model artifact to")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed and data, same model (default 0)")
    parser.add_argument("--hidden_size", type=int, default=32, help="LSTM hidden size (default 32)")
    parser.add_argument("--calibration_events", type=int, default=100,
                        help="per-device warm-up events used to fit each device's baseline (default 100)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    missing = [str(p) for p in args.input if not p.is_file()]
    if missing:
        parser.error(f"input files not found: {', '.join(missing)}")
    artifact = train(args.input, args.output_dir, epochs=args.epochs, seed=args.seed, hidden_size=args.hidden_size,
                     calibration_events=args.calibration_events)
    print(f"wrote {artifact.version} to {artifact.path}")


if __name__ == "__main__":
    main()
