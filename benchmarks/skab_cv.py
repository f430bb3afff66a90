"""Leave-files-out cross-validation of the detector's training steps and post-processing on SKAB's files.

Each group folder's labelled files are dealt round-robin into ``folds``
folds (valve1: files 0, 4, 8, 12 in the first, ...). For each fold, every
grid point (a model per number of training steps, times :data:`GRID`) is
scored on the *other* folds' files and the best is chosen (highest pooled F1
with FAR at most :data:`MAX_FAR`, else the lowest FAR); the fold's own files
are then scored with that choice only. The pooled counts over all folds are
the cross-validated figure: no file's alarms come from parameters chosen
with that file.

What the folds do not cover: each model is trained on the anomaly-free file
and the first 400 rows of every file, as SKAB's protocol allows (those rows
are calibration data, never labelled rows); the detector's design and the
grid's range were chosen by the developers looking at valve1 as a whole.

Scoring runs the job's detector and head offline (:mod:`models.offline`), one
device per file, so a grid point costs about a second on one core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

import numpy as np

from benchmarks.skab_metrics import Counts
from models.artifact import ModelArtifact
from models.detector import PostProcessing
from models.offline import score_device

if TYPE_CHECKING:
    from benchmarks.skab import SkabFile

FOLDS = 4
MAX_FAR = 10.0  # per cent, the target
# Training steps: the LSTM learns the training devices' own dynamics, and a longer fit follows more of them (a pool
# with the anomaly-free file as 8 devices took valve1's F1 from 0.88 at 30 steps to 0.79 at 100).
EPOCHS = (10, 30, 100)
# EWMA span of the residual evidence and the alarm factor: the two choices the valve1 research found to matter.
GRID = tuple(PostProcessing(ewma_span=span, factor=factor)
             for span in (30, 45, 60) for factor in (1.0, 1.25, 1.5, 1.75, 2.0))


def folds_of(files: Sequence["SkabFile"], folds: int = FOLDS) -> list[list[int]]:
    """Indices into `files` (labelled ones only) per fold, dealt round-robin within each group folder."""
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        if f.labels is not None:
            groups.setdefault(f.device_id.rsplit("-", 1)[0], []).append(i)
    result: list[list[int]] = [[] for _ in range(folds)]
    for members in groups.values():
        for n, i in enumerate(members):
            result[n % folds].append(i)
    return [fold for fold in result if fold]


class Choice(NamedTuple):
    """One grid point: the model (by its training steps) and the post-processing."""

    epochs: int
    post: PostProcessing

    def describe(self) -> str:
        return f"epochs {self.epochs}, ewma_span {self.post.ewma_span}, factor {self.post.factor}"


def alarms_for(artifact: ModelArtifact, f: "SkabFile", post: PostProcessing, calibration_events: int,
               quantize: str = "none") -> np.ndarray:
    """is_anomaly per row of `f`, as the job would emit it with `post` in place of the artifact's."""
    scored = score_device(artifact.detector(calibration_events, quantize, post), f.readings)
    return (scored.scores > post.factor) & ~scored.calibrating


def pooled(files: Sequence["SkabFile"], alarms: dict[int, np.ndarray], indices: Sequence[int],
           calibration_events: int) -> Counts:
    """Point-wise counts of the files at `indices`, rows after calibration, pooled."""
    counts = Counts()
    for i in indices:
        counts.add(alarms[i][calibration_events:], files[i].labels[calibration_events:].astype(bool))
    return counts


def choose(files: Sequence["SkabFile"], alarms: dict[Choice, dict[int, np.ndarray]], indices: Sequence[int],
           calibration_events: int) -> Choice:
    """The grid point with the best pooled F1 on `indices` among those with FAR <= MAX_FAR (else the lowest FAR)."""
    def rank(choice: Choice) -> tuple:
        counts = pooled(files, alarms[choice], indices, calibration_events)
        return (counts.far <= MAX_FAR, counts.f1 if counts.far <= MAX_FAR else -counts.far)
    return max(alarms, key=rank)


@dataclass
class CrossValidation:
    """The cross-validated counts, the choice per fold, every file's cross-validated alarms, and the all-file choice."""

    counts: Counts
    choices: list[tuple[list[int], Choice]]
    alarms: dict[int, np.ndarray]
    chosen_on_all: Choice
    tuned_counts: Counts


def cross_validate(artifacts: Mapping[int, ModelArtifact], files: Sequence["SkabFile"], calibration_events: int,
                   grid: Sequence[PostProcessing] = GRID, folds: int = FOLDS) -> CrossValidation:
    """Leave-folds-out choice of the training steps (`artifacts` by epochs) and the post-processing."""
    fold_indices = folds_of(files, folds)
    everything = [i for fold in fold_indices for i in fold]
    alarms = {}
    for epochs, artifact in artifacts.items():
        for point in grid:
            post = replace(artifact.post_processing, ewma_span=point.ewma_span, factor=point.factor)
            alarms[Choice(epochs, post)] = {i: alarms_for(artifact, files[i], post, calibration_events)
                                            for i in everything}
    counts, choices, cv_alarms = Counts(), [], {}
    for fold in fold_indices:
        tuning = [i for i in everything if i not in fold] or fold  # one fold only: nothing held out
        choice = choose(files, alarms, tuning, calibration_events)
        choices.append((fold, choice))
        for i in fold:
            cv_alarms[i] = alarms[choice][i]
        counts = counts + pooled(files, alarms[choice], fold, calibration_events)
    on_all = choose(files, alarms, everything, calibration_events)
    return CrossValidation(counts, choices, cv_alarms, on_all, pooled(files, alarms[on_all], everything,
                                                                      calibration_events))
