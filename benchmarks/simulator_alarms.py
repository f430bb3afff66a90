"""How the detector's alarms on the built-in simulated line match the simulator's injected faults.

    python -m benchmarks.simulator_alarms [--model_dir DIR] [--devices 20] [--steps 600]
        [--calibration_events N] [--seed 0] [--fault_rate 2.0]

``./run_local.sh`` shows an anomaly count; this says whether that count is
believable. The simulator knows which events are faulty, so the job's
per-device logic (:class:`transforms.device_state.DeviceLogic`, the code the
DoFn runs) and its scoring head are run over two simulated fleets, one
fault-free and one with faults, and the alarms are counted against the labels
over the events after calibration. No pipeline: the numbers are the job's, in
seconds. An alarm in the EWMA's tail after a fault (``ewma_span`` events) is
caused by the fault but counts as false in the strict precision; the
``precision_with_tails`` counts it as caused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from beam_jobs.simulator import LineSimulator, SimulatorConfig
from models.artifact import BUNDLED_MODEL_DIR, ModelArtifact, load_artifact
from models.bundle import job_default_calibration_events


@dataclass(frozen=True)
class AlarmCounts:
    """Alarms against fault labels over the events after calibration."""

    scored: int
    faulty: int
    alarms: int
    alarms_on_faults: int
    alarms_after_faults: int

    @property
    def fault_free_alarm_rate(self) -> float:
        """False alarms per fault-free event: what a maintenance crew would chase for nothing."""
        return (self.alarms - self.alarms_on_faults) / max(self.scored - self.faulty, 1)

    @property
    def precision(self) -> float:
        """Share of alarms on faulty events; strict, so an alarm while the evidence decays after a fault is false."""
        return self.alarms_on_faults / self.alarms if self.alarms else float("nan")

    @property
    def precision_with_tails(self) -> float:
        return (self.alarms_on_faults + self.alarms_after_faults) / self.alarms if self.alarms else float("nan")

    @property
    def recall(self) -> float:
        """Share of faulty events alarmed on, point-wise; slow ramps and one-reading spikes keep it low."""
        return self.alarms_on_faults / self.faulty if self.faulty else float("nan")

    def summary(self) -> dict:
        figures = {"fault_free_alarm_rate": self.fault_free_alarm_rate, "precision": self.precision,
                   "precision_with_tails": self.precision_with_tails, "recall": self.recall}
        return {**asdict(self), **{k: round(v, 4) for k, v in figures.items()}}


def count_alarms(artifact: ModelArtifact, config: SimulatorConfig, steps: int, calibration_events: int) -> AlarmCounts:
    """Scores `steps` simulated steps of every device the way the job does and counts alarms against labels."""
    from transforms.device_state import DeviceLogic  # imports Beam; late, so --help stays quick

    logic = DeviceLogic.for_artifact(artifact, state_ttl_ms=2**62, calibration_events=calibration_events)
    tail = artifact.post_processing.ewma_span
    states, since_fault = {}, {}
    rows, labels, in_tail = [], [], []
    for event, is_fault in LineSimulator(config).take(config.devices * steps):
        device = event["device_id"]
        step = logic.on_event(states.get(device), event["event_time"], event["readings"], "simulated")
        states[device] = step.state
        since_fault[device] = 0 if is_fault else since_fault.get(device, tail) + 1
        if not step.calibrating:
            rows.append(step.model_input)
            labels.append(is_fault)
            in_tail.append(not is_fault and since_fault[device] <= tail)
    if not rows:
        return AlarmCounts(0, 0, 0, 0, 0)
    with torch.no_grad():
        scores = artifact.head()(torch.as_tensor(np.stack(rows)))[:, 0].numpy()
    alarms, faulty, in_tail = scores > artifact.threshold, np.array(labels), np.array(in_tail)
    return AlarmCounts(len(rows), int(faulty.sum()), int(alarms.sum()), int((alarms & faulty).sum()),
                       int((alarms & in_tail).sum()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulator_alarms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=BUNDLED_MODEL_DIR, help="model artifact (default bundled)")
    parser.add_argument("--devices", type=int, default=20, help="simulated machines (default 20)")
    parser.add_argument("--steps", type=int, default=600, help="events per machine (default 600)")
    parser.add_argument("--calibration_events", type=int, default=None,
                        help="as the job's option (default: the job's default)")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default 0, as run_local.sh)")
    parser.add_argument("--fault_rate", type=float, default=2.0, help="faults per machine-hour (default 2.0)")
    args = parser.parse_args(argv)
    artifact = load_artifact(args.model_dir)
    calibration_events = args.calibration_events or job_default_calibration_events()
    for name, rate in (("fault-free", 0.0), ("with faults", args.fault_rate)):
        config = SimulatorConfig(devices=args.devices, seed=args.seed, fault_rate_per_hour=rate)
        counts = count_alarms(artifact, config, args.steps, calibration_events)
        print(json.dumps({"fleet": name, **counts.summary()}), flush=True)


if __name__ == "__main__":
    main()
