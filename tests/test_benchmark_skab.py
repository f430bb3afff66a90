"""The SKAB benchmark end to end on a small subset: recordings, training, broker, job, scores, report, plots.

Needs the SKAB data in ../shared/data/skab (skipped without it). The subset is
written to a temporary folder: the anomaly-free file cut to 1000 rows and two
valve1 files, trained for a few steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.skab import CALIBRATION_EVENTS, load_skab, read_csv, run, write_recordings
from models.train import read_device_sequences

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "skab"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"SKAB data not found in {DATA}")


@pytest.fixture
def subset(tmp_path) -> Path:
    (tmp_path / "anomaly-free").mkdir()
    (tmp_path / "valve1").mkdir()
    lines = (DATA / "anomaly-free" / "anomaly-free.csv").read_text().splitlines(keepends=True)
    (tmp_path / "anomaly-free" / "anomaly-free.csv").write_text("".join(lines[:1001]))
    for name in ("1.csv", "3.csv"):
        (tmp_path / "valve1" / name).write_text((DATA / "valve1" / name).read_text())
    return tmp_path


def test_csv_rows_become_events_with_labels_and_change_points():
    f = read_csv(DATA / "valve1" / "1.csv", "valve1-1")
    event = next(iter(f.events()))
    assert event["event_id"] == "valve1-1-0" and event["device_id"] == "valve1-1"
    assert len(event["readings"]) == 8 and "anomaly" not in event["readings"] and "changepoint" not in event["readings"]
    assert f.labels is not None and f.labels.sum() > 0 and len(f.labels) == len(f.times_ms)
    assert f.changepoints is not None and len(f.changepoints) >= 2
    assert f.labels[f.changepoints[0]] == 1 and f.labels[f.changepoints[0] - 1] == 0  # the anomaly starts at one


def test_training_sees_only_the_anomaly_free_file_and_calibration_rows(subset, tmp_path):
    files = load_skab(subset)
    _, training = write_recordings(files, tmp_path / "recordings", CALIBRATION_EVENTS)
    lengths = {d: len(events) for d, events in read_device_sequences(training).items()}
    assert lengths == {"anomaly-free-anomaly-free": 1000, "valve1-1": CALIBRATION_EVENTS,
                       "valve1-3": CALIBRATION_EVENTS}


@pytest.mark.slow
def test_benchmark_runs_through_the_job_and_reports(subset, tmp_path, capsys):
    results = run(subset, tmp_path / "out", quantize=["none"], epochs=[2, 5], seed=0)
    printed = capsys.readouterr().out
    assert "pooled over 2 labelled files" in printed and "| valve1-3 |" in printed
    assert "## cross-validated, leave-files-out (2 folds)" in printed and "NAB (60 s window" in printed
    assert "| missing |" in printed  # the fault-type table
    counts = results["none"]
    labelled_rows = sum(len(f.times_ms) - CALIBRATION_EVENTS for f in load_skab(subset) if f.labels is not None)
    assert counts.tp + counts.fp + counts.fn + counts.tn == labelled_rows
    assert counts.f1 > 0.5
    assert len(list((tmp_path / "out").glob("quantize-none-*.png"))) == 3
