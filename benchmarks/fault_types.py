"""Recall per fault type on a simulated fleet, at a fixed false-alarm rate, and the detection delay.

    python -m benchmarks.fault_types [--model_dir DIR] [--devices 20] [--sigma 6] [--seed 0]

SKAB's valve1 has one kind of fault (a flow drop); plants have more. This
takes the built-in simulator's fault-free fleet (beam_jobs/simulator.py, no
missing readings) and, per device, injects one fault of each type into a
copy of its series, :data:`FAULT_EVENTS` events long, starting
:data:`LEAD_EVENTS` events after calibration, on one reading (round-robin
over devices). Sizes are in units of σ, the std of that reading over the
device's calibration events, the scale the detector normalises by:

- ``step``: the reading moves by +σ·sigma (sign alternating by device);
- ``drift``: a ramp from 0 to 2·sigma·σ (past sigma·σ for the second half);
- ``variance``: added Gaussian noise of std sigma·σ/2;
- ``stuck``: the reading repeats its value at the fault's start;
- ``spikes``: four bursts of five events at +sigma·σ;
- ``correlated``: three readings move together by sigma·σ/2 each;
- ``missing``: the reading is absent; this must not alarm.

Each series is scored with the job's detector and head (models/offline.py).
A fault counts as detected when an alarm falls inside its window; the delay
is events from its start to the first alarm. Alarms are read at two
thresholds: the model's own (its ``factor``) and the score quantile that
gives :data:`FIXED_FAR` of alarms on the fault-free fleet after calibration.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from beam_jobs.simulator import FEATURES, LineSimulator, SimulatorConfig
from models.artifact import BUNDLED_MODEL_DIR, ModelArtifact, load_artifact
from models.offline import score_device
from models.preprocessing import readings_vector

FAULT_TYPES = ("step", "drift", "variance", "stuck", "spikes", "correlated", "missing")
FAULT_EVENTS = 100
LEAD_EVENTS = 100  # normal events between calibration and the fault
TAIL_EVENTS = 60
FIXED_FAR = 0.01


def clean_fleet(devices: int, events: int, seed: int, features: Sequence[str] = FEATURES) -> np.ndarray:
    """(devices, events, features) of the simulator's fault-free line without missing readings, `features` in order."""
    config = SimulatorConfig(devices=devices, seed=seed, fault_rate_per_hour=0.0, missing_rate=0.0)
    rows = [readings_vector(event["readings"], features) for event, _ in LineSimulator(config).take(devices * events)]
    return np.array(rows).reshape(events, devices, len(features)).transpose(1, 0, 2)


def inject(series: np.ndarray, kind: str, start: int, feature: int, sigma: np.ndarray, size: float,
           rng: np.random.Generator, sign: float = 1.0) -> np.ndarray:
    """A copy of one device's (events, features) series with one fault of `kind` over [start, start + FAULT_EVENTS)."""
    out = series.copy()
    window = slice(start, start + FAULT_EVENTS)
    ramp = np.arange(1, FAULT_EVENTS + 1) / FAULT_EVENTS
    s = sigma[feature]
    if kind == "step":
        out[window, feature] += sign * size * s
    elif kind == "drift":
        out[window, feature] += sign * 2 * size * s * ramp
    elif kind == "variance":
        out[window, feature] += rng.normal(0.0, size * s / 2, FAULT_EVENTS)
    elif kind == "stuck":
        out[window, feature] = series[start, feature]
    elif kind == "spikes":
        bursts = [start + b + i for b in range(0, FAULT_EVENTS, FAULT_EVENTS // 4) for i in range(5)]
        out[bursts, feature] += sign * size * s
    elif kind == "correlated":
        hit = [(feature + k) % series.shape[1] for k in range(3)]
        out[window, hit] += sign * size / 2 * sigma[hit]
    elif kind == "missing":
        out[window, feature] = np.nan
    else:
        raise ValueError(f"unknown fault type {kind!r}; known: {', '.join(FAULT_TYPES)}")
    return out


@dataclass
class TypeResult:
    """One fault type over the fleet: detections at the model's threshold and at the fixed-FAR one."""

    kind: str
    faults: int
    detected: int
    detected_fixed: int
    delays: list[int]
    alarm_share: float  # share of the fault window's events that alarm (model threshold)
    clean_detected: int  # the same windows without the fault that alarm: the base rate
    clean_share: float  # share of the same windows' events that alarm without the fault

    @property
    def recall(self) -> float:
        return self.detected / max(self.faults, 1)

    @property
    def recall_fixed(self) -> float:
        return self.detected_fixed / max(self.faults, 1)

    def row(self) -> str:
        delay = f"{np.median(self.delays):.0f}" if self.delays else "-"
        return (f"| {self.kind} | {self.faults} | {self.recall:.2f} | {self.recall_fixed:.2f} | {delay} "
                f"| {100 * self.alarm_share:.1f} | {self.clean_detected / max(self.faults, 1):.2f} |")


@dataclass
class FaultTypeReport:
    types: list[TypeResult]
    fault_free_alarm_rate: float  # at the model's threshold, after calibration
    fixed_threshold: float  # the score at which the fault-free fleet alarms FIXED_FAR of the time

    def table(self) -> str:
        lines = [f"fault-free fleet: {100 * self.fault_free_alarm_rate:.2f}% of events alarm at the model's "
                 f"threshold; the {100 * FIXED_FAR:.0f}%-FAR threshold is score {self.fixed_threshold:.2f}",
                 "| fault | faults | recall (model threshold) | recall (FAR 1%) | median delay, events "
                 "| alarms in window % | same windows without the fault |", "|---|---|---|---|---|---|---|"]
        return "\n".join(lines + [t.row() for t in self.types])


def evaluate(artifact: ModelArtifact, calibration_events: int, devices: int = 20, size: float = 6.0,
             seed: int = 0) -> FaultTypeReport:
    """Injects every fault type into every device of a simulated fleet and scores them (module docstring)."""
    start = calibration_events + LEAD_EVENTS
    fleet = clean_fleet(devices, start + FAULT_EVENTS + TAIL_EVENTS, seed, artifact.features)
    rng = np.random.default_rng(seed)
    detector = artifact.detector(calibration_events)
    score: Callable[[np.ndarray], np.ndarray] = lambda raw: score_device(detector, raw).scores
    clean_scores = np.stack([score(series) for series in fleet])
    clean = clean_scores[:, calibration_events:]
    fixed = float(np.quantile(clean, 1.0 - FIXED_FAR))
    factor = artifact.post_processing.factor
    clean_window = clean_scores[:, start:start + FAULT_EVENTS] > factor
    clean_detected, clean_share = int(np.sum(np.any(clean_window, axis=1))), float(np.mean(clean_window))
    results = []
    for k, kind in enumerate(FAULT_TYPES):
        detected = detected_fixed = 0
        delays, shares = [], []
        for d, series in enumerate(fleet):
            sigma = np.std(series[:calibration_events], axis=0)
            faulty = inject(series, kind, start, (d + k) % series.shape[1], sigma, size, rng, 1.0 if d % 2 else -1.0)
            window = score(faulty)[start:start + FAULT_EVENTS]
            alarms = np.flatnonzero(window > factor)
            detected += bool(len(alarms))
            detected_fixed += bool(np.any(window > fixed))
            shares.append(len(alarms) / FAULT_EVENTS)
            if len(alarms):
                delays.append(int(alarms[0]))
        results.append(TypeResult(kind, len(fleet), detected, detected_fixed, delays, float(np.mean(shares)),
                                  clean_detected, clean_share))
    return FaultTypeReport(results, float(np.mean(clean > factor)), fixed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fault_types", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=BUNDLED_MODEL_DIR,
                        help="model trained on the simulator's normal fleet (default bundled)")
    parser.add_argument("--calibration_events", type=int, default=None,
                        help="as the job's option (default: the model's training windows)")
    parser.add_argument("--devices", type=int, default=20, help="simulated machines, one fault of each type each")
    parser.add_argument("--sigma", type=float, default=6.0, help="fault size in calibration sigmas (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="simulator and noise seed (default 0)")
    args = parser.parse_args(argv)
    artifact = load_artifact(args.model_dir)
    calibration = args.calibration_events or int(artifact.spec["training"]["calibration_events"])
    print(evaluate(artifact, calibration, args.devices, args.sigma, args.seed).table())


if __name__ == "__main__":
    main()
