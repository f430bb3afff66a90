"""The SKAB benchmark: cross-validated offline, then through the streaming job; and the fault-type table.

    python -m benchmarks.skab --data DIR [--output_dir out/skab] [--quantize none int8] [--epochs N ...] [--seed S]

DIR holds SKAB's ``anomaly-free/`` and group folders (``valve1/`` ...) of
``;``-separated CSVs. Steps:

1. every file becomes a recording (one device per file, device_id
   ``group-file``, event_time from ``datetime`` read as UTC); ``models.train``
   trains on the anomaly-free recording plus the first
   ``--calibration_events`` rows of every labelled file, nothing else, once
   per number of training steps in ``--epochs``;
2. leave-files-out cross-validation (benchmarks/skab_cv.py) chooses the
   training steps and the post-processing on the other folds for each fold
   and prints the pooled
   cross-validated F1/FAR/MAR with NAB scores: the figure to quote. It also
   prints the choice made on all files and its (tuned, optimistic) figure;
3. an embedded broker is started, all recordings are replayed into it keyed
   by device; the job runs bounded (``--calibration_events 400``) once per
   ``--quantize`` choice with that all-file choice; the score topic is read
   back, joined to the labels by event_id, and scored point-wise over the
   rows after calibration (SKAB's protocol), pooled over all labelled files,
   plus NAB, a per-file table and PNG plots for a few files;
4. the fault-type table of benchmarks/fault_types.py on the simulated line.

The anomaly-free file is training data, so it is not part of the pooled
figures; its false-alarm rate after calibration is printed on its own.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from beam_jobs.embedded_broker import EmbeddedBroker
from beam_jobs.recordings import write_events
from beam_jobs.replay import replay
from benchmarks import fault_types
from benchmarks.skab_cv import (EPOCHS, FREE_SEGMENT, CrossValidation, alarms_for, cross_validate, free_segments,
                                segment_alarm_rates)
from benchmarks.skab_metrics import Counts, nab_scores
from models.artifact import BUNDLED_MODEL_DIR, ModelArtifact, load_artifact
from models.detector import PostProcessing
from models.train import train
from schemas.serde import SCORE, AvroDecoder
from transforms.kafka_client import KafkaConfig, read_topic

_LOG = logging.getLogger("benchmarks.skab")
FREE_GROUP = "anomaly-free"
LABEL_COLUMNS = ("anomaly", "changepoint")
PLOTTED_FILES = 4
CALIBRATION_EVENTS = 400  # SKAB's protocol: the first 400 rows of each file are training/calibration


@dataclass(frozen=True)
class SkabFile:
    """One CSV: a device's readings per row, and its labels (None for the anomaly-free file)."""

    device_id: str
    times_ms: np.ndarray
    features: tuple[str, ...]
    readings: np.ndarray
    labels: np.ndarray | None
    changepoints: np.ndarray | None = None  # row indices of the labelled change points

    def events(self, rows: slice = slice(None)) -> Iterable[dict]:
        for i in range(len(self.times_ms))[rows]:
            values = {name: (None if np.isnan(v) else float(v)) for name, v in zip(self.features, self.readings[i])}
            yield {"event_id": event_id(self.device_id, i), "device_id": self.device_id,
                   "event_time": int(self.times_ms[i]), "readings": values}


def event_id(device_id: str, row: int) -> str:
    return f"{device_id}-{row}"


def read_csv(path: Path, device_id: str) -> SkabFile:
    """A SKAB CSV; empty cells are missing readings."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=";"))
    header, body = rows[0], [r for r in rows[1:] if r]
    features = tuple(c for c in header[1:] if c not in LABEL_COLUMNS)
    times = np.array([_millis(r[0]) for r in body], dtype=np.int64)
    readings = np.array([[float(v) if v else np.nan for v in r[1:1 + len(features)]] for r in body])
    labels = (np.array([int(float(r[header.index("anomaly")])) for r in body]) if "anomaly" in header else None)
    changepoints = (np.flatnonzero([float(r[header.index("changepoint")]) > 0 for r in body])
                    if "changepoint" in header else None)
    return SkabFile(device_id, times, features, readings, labels, changepoints)


def _millis(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp() * 1000)


def load_skab(data: Path, groups: Sequence[str] | None = None) -> list[SkabFile]:
    """The anomaly-free file and every labelled file of `groups` (default all group folders), in name order."""
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    chosen = [p for p in folders if p.name == FREE_GROUP or groups is None or p.name in groups]
    return [read_csv(path, f"{folder.name}-{path.stem}") for folder in chosen
            for path in sorted(folder.glob("*.csv"), key=lambda p: (len(p.stem), p.stem))]


def write_recordings(files: Sequence[SkabFile], folder: Path, calibration_events: int) -> tuple[list[Path], list[Path]]:
    """(every file's full recording, the training recordings: anomaly-free whole, others' calibration rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    full, training = [], []
    for f in files:
        path = folder / f"{f.device_id}.avro"
        write_events(path, f.events())
        full.append(path)
        if f.labels is None:
            training.append(path)
        else:
            training.append(folder / f"{f.device_id}-calibration.avro")
            write_events(training[-1], f.events(slice(0, calibration_events)))
    return full, training


def read_scores(config: KafkaConfig, topic: str) -> dict[str, dict]:
    """Every SensorScore of `topic` up to its end offsets now, by event_id."""
    decode = AvroDecoder(SCORE)
    return {score["event_id"]: score for score in (decode(r.value) for r in read_topic(config, topic))}


def run_job(config: KafkaConfig, model_dir: Path, name: str, calibration_events: int, quantize: str) -> str:
    """Runs the job bounded over the input topic in a child process; returns its score topic."""
    topic = f"skab-scores-{name}"
    command = [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bounded", "--bootstrap_servers",
               config.bootstrap_servers, "--input_topic", "skab-events", "--score_topic", topic,
               "--dead_letter_topic", f"skab-dead-{name}", "--drift_topic", f"skab-drift-{name}",
               "--consumer_group", f"skab-{name}", "--start_from", "earliest", "--model_dir", str(model_dir),
               "--calibration_events", str(calibration_events), "--quantize", quantize]
    _LOG.info("running the job: %s", " ".join(command[1:]))
    subprocess.run(command, check=True)
    return topic


def alarms(f: SkabFile, scores: dict[str, dict]) -> np.ndarray:
    """is_anomaly per row; a row without a score (never expected) counts as no alarm and is reported."""
    missing = [i for i in range(len(f.times_ms)) if event_id(f.device_id, i) not in scores]
    if missing:
        _LOG.warning("%s: %d rows have no score", f.device_id, len(missing))
    return np.array([bool(scores.get(event_id(f.device_id, i), {}).get("is_anomaly")) for i in range(len(f.times_ms))])


def evaluate(files: Sequence[SkabFile], scores: dict[str, dict], calibration_events: int) -> tuple[Counts, list[str]]:
    """Pooled counts over labelled files' rows after calibration, and the per-file table lines."""
    pooled, lines = Counts(), []
    header = "| file | F1 | FAR % | MAR % | TP | FP | FN | TN |\n|---|---|---|---|---|---|---|---|"
    for f in files:
        predicted = alarms(f, scores)[calibration_events:]
        labels = (np.zeros(len(predicted), dtype=bool) if f.labels is None
                  else f.labels[calibration_events:].astype(bool))
        counts = Counts()
        counts.add(predicted, labels)
        lines.append(counts.row(f.device_id + (" (training file)" if f.labels is None else "")))
        if f.labels is not None:
            pooled.add(predicted, labels)
    return pooled, [header, *lines]


def plot(f: SkabFile, scores: dict[str, dict], path: Path) -> None:
    """Score and threshold over rows, with labelled anomalies shaded and alarms marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [scores.get(event_id(f.device_id, i)) for i in range(len(f.times_ms))]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.plot(x, [r["score"] if r else np.nan for r in rows], lw=0.8, label="score")
    ax.plot(x, [r["threshold"] if r else np.nan for r in rows], "--", color="grey", lw=1, label="threshold")
    if f.labels is not None:
        ax.fill_between(x, 0, 1, where=f.labels.astype(bool), transform=ax.get_xaxis_transform(), color="orange",
                        alpha=0.25, label="labelled anomaly")
    alarm = [i for i, r in enumerate(rows) if r and r["is_anomaly"]]
    ax.scatter(alarm, [rows[i]["score"] for i in alarm], color="red", s=4, zorder=3, label="alarm")
    ax.axvline(CALIBRATION_EVENTS, color="black", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("row (calibration left of the black line)")
    ax.set_title(f.device_id)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



def report(files: Sequence[SkabFile], scores: dict[str, dict], name: str, output_dir: Path) -> Counts:
    """Prints the pooled figures and per-file table of one job run; writes its plots."""
    pooled, table = evaluate(files, scores, CALIBRATION_EVENTS)
    labelled_files = sum(f.labels is not None for f in files)
    print(f"\n## {name} job run, parameters tuned on these files: pooled over {labelled_files} labelled files, rows >= "
          f"{CALIBRATION_EVENTS}: F1 {pooled.f1:.3f}  FAR {pooled.far:.2f}%  MAR {pooled.mar:.2f}%\n")
    print("\n".join(table))
    labelled = [f for f in files if f.labels is not None]
    step = max(len(labelled) // PLOTTED_FILES, 1)
    for f in [*labelled[::step][:PLOTTED_FILES], *(f for f in files if f.labels is None)]:
        plot(f, scores, output_dir / f"{name}-{f.device_id}.png")
    return pooled


def nab_of(files: Sequence[SkabFile], alarms_by_file: dict[int, np.ndarray]) -> dict[str, float]:
    """NAB scores (per profile) of per-file alarms over the rows after calibration and the change points there."""
    return nab_scores((files[i].times_ms[CALIBRATION_EVENTS:], a[CALIBRATION_EVENTS:],
                       files[i].times_ms[files[i].changepoints[files[i].changepoints >= CALIBRATION_EVENTS]])
                      for i, a in alarms_by_file.items())


def nab_line(scores: dict[str, float]) -> str:
    return "NAB (60 s window right of each change point): " + "  ".join(f"{k} {v:.1f}" for k, v in scores.items())


def free_segments_far(artifact: ModelArtifact, files: Sequence[SkabFile], post: PostProcessing) -> str:
    """The anomaly-free file cut into SKAB-file-sized devices: how often normal operation elsewhere alarms."""
    segments = free_segments(files)
    if not segments:
        return f"no anomaly-free file of at least {FREE_SEGMENT} rows"
    rates = segment_alarm_rates(artifact, segments, post, CALIBRATION_EVENTS)
    return (f"anomaly-free file as {len(rates)} devices of {FREE_SEGMENT} rows (half overlapping), each calibrated on "
            f"its first {CALIBRATION_EVENTS}: {100 * np.mean(rates):.1f}% of their later rows alarm (range "
            f"{100 * min(rates):.0f}-{100 * max(rates):.0f}%; training data, so optimistic)")


def report_cv(artifacts: Mapping[int, ModelArtifact], files: Sequence[SkabFile], cv: CrossValidation) -> None:
    """Prints the cross-validated figures (the ones to quote), int8's, NAB's, and the all-file choice (tuned)."""
    c = cv.counts
    print(f"\n## cross-validated, leave-files-out ({len(cv.choices)} folds): F1 {c.f1:.3f}  FAR {c.far:.2f}%  "
          f"MAR {c.mar:.2f}%  (TP {c.tp} FP {c.fp} FN {c.fn} TN {c.tn})")
    print(nab_line(nab_of(files, cv.alarms)))
    int8 = {i: alarms_for(artifacts[choice.epochs], files[i], choice.post, CALIBRATION_EVENTS, "int8")
            for fold, choice in cv.choices for i in fold}
    counts = Counts()
    for i, a in int8.items():
        counts.add(a[CALIBRATION_EVENTS:], files[i].labels[CALIBRATION_EVENTS:].astype(bool))
    print(f"int8, same choices: F1 {counts.f1:.3f}  FAR {counts.far:.2f}%  MAR {counts.mar:.2f}% "
          f"(F1 {counts.f1 - c.f1:+.3f} against float)")
    for fold, choice in cv.choices:
        names = ", ".join(files[i].device_id for i in fold)
        print(f"- fold {names}: chosen on the other folds: {choice.describe()} (anomaly-free segments alarm "
              f"{cv.normal_far[choice]:.1f}%)")
    t, on_all = cv.tuned_counts, cv.chosen_on_all
    print(f"tuned on all these files (not a generalisation figure): {on_all.describe()}: F1 {t.f1:.3f}  "
          f"FAR {t.far:.2f}%  MAR {t.mar:.2f}%")
    print(free_segments_far(artifacts[on_all.epochs], files, on_all.post))


def run(data: Path, output_dir: Path, *, quantize: Sequence[str], epochs: Sequence[int], seed: int,
        groups: Sequence[str] | None = None, fault_model: Path = BUNDLED_MODEL_DIR) -> dict[str, Counts]:
    """The whole benchmark; returns the pooled counts of each job run (parameters tuned on all files)."""
    started = time.monotonic()
    files = load_skab(data, groups)
    full, training = write_recordings(files, output_dir / "recordings", CALIBRATION_EVENTS)
    model_dir = output_dir / "model"
    artifacts = {}
    for steps in epochs:
        trained_at = time.monotonic()
        artifacts[steps] = train(training, model_dir.with_name(f"model-epochs-{steps}"), epochs=steps, seed=seed,
                                 calibration_events=CALIBRATION_EVENTS)
        print(f"trained {artifacts[steps].version} ({steps} epochs) in {time.monotonic() - trained_at:.1f} s")
    cv = cross_validate(artifacts, files, CALIBRATION_EVENTS)
    report_cv(artifacts, files, cv)
    train(training, model_dir, epochs=cv.chosen_on_all.epochs, seed=seed, calibration_events=CALIBRATION_EVENTS,
          post=cv.chosen_on_all.post)  # what the job runs: the all-file choice
    results = {}
    with EmbeddedBroker() as broker:
        config = KafkaConfig(broker.bootstrap_servers)
        sent = replay(full, config, "skab-events")
        print(f"\nreplayed {sent} events of {len(files)} files")
        for choice in quantize:
            topic = run_job(config, model_dir, choice, CALIBRATION_EVENTS, choice)
            scores = read_scores(config, topic)
            print(f"job ({choice}): {len(scores)} scores for {sent} events")
            results[choice] = report(files, scores, f"quantize-{choice}", output_dir)
            print(nab_line(nab_of(files, {i: alarms(f, scores) for i, f in enumerate(files) if f.labels is not None})))
    print(f"\n## fault types on the simulated line ({fault_model.name} model, trained on its normal fleet)\n")
    fault_artifact = load_artifact(fault_model)
    print(fault_types.evaluate(fault_artifact, int(fault_artifact.spec["training"]["calibration_events"])).table())
    print(f"\nbenchmark took {time.monotonic() - started:.0f} s; plots in {output_dir}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.skab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="SKAB folder with anomaly-free/ and group folders")
    parser.add_argument("--output_dir", type=Path, default=Path("out/skab"), help="default out/skab")
    parser.add_argument("--quantize", nargs="+", choices=("none", "int8"), default=["none", "int8"],
                        help="job runs to measure (default: none int8)")
    parser.add_argument("--groups", nargs="+", help="group folders to use (default: all)")
    parser.add_argument("--epochs", type=int, nargs="+", default=list(EPOCHS),
                        help=f"training steps to choose from by cross-validation (default {' '.join(map(str, EPOCHS))})")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--fault_model", type=Path, default=BUNDLED_MODEL_DIR,
                        help="model for the fault-type table, trained on the simulated line (default bundled)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    run(args.data, args.output_dir, quantize=args.quantize, epochs=args.epochs, seed=args.seed, groups=args.groups,
        fault_model=args.fault_model)


if __name__ == "__main__":
    main()
