"""File mode (--input_files/--output_dir): outputs, determinism across runs and workers, golden scores."""

from __future__ import annotations

from pathlib import Path

import fastavro
import pytest

from beam_jobs import compare, sensor_scoring
from beam_jobs.recordings import RecordingError, write_events
from beam_jobs.simulator import LineSimulator, SimulatorConfig
from schemas.serde import SCORE, AvroEncoder

GOLDEN = Path(__file__).resolve().parent / "golden"
# The golden scores were made with these options; tests/golden/README.md has the command.
GOLDEN_OPTIONS = ("--calibration_events", "30")
# Scores are float32: run-to-run noise is a few ulps (see test_scores_are_byte_identical...).
FLOAT_NOISE = 1e-4
WORKER_VARIANTS = {
    "one worker": ("--direct_num_workers", "1"),
    "one worker again": ("--direct_num_workers", "1"),
    "two threads": ("--direct_num_workers", "2", "--direct_running_mode", "multi_threading"),
    "two processes": ("--direct_num_workers", "2", "--direct_running_mode", "multi_processing"),
}


def score_file_mode(recordings: str, output_dir: Path, *extra: str) -> Path:
    """Runs the job in file mode; returns its scores file."""
    sensor_scoring.run(["--input_files", recordings, "--output_dir", str(output_dir), *extra])
    return output_dir / "scores-00000-of-00001.avro"


def read_avro(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(fastavro.reader(f))


def canonical_bytes(path: Path) -> dict[str, bytes]:
    """Each score's Avro encoding with processed_at zeroed, by event_id: equal means byte-identical."""
    encode = AvroEncoder(SCORE)
    return {s["event_id"]: encode({**s, "processed_at": 0}) for s in read_avro(path)}


def invalid_events(template: dict) -> list[dict]:
    """Events that decode but fail validation, so file mode must dead-letter them."""
    return [{**template, "event_id": "bad-nan", "readings": {"temperature": float("nan")}},
            {**template, "event_id": "bad-device", "device_id": " "}]


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    events = [e for e, _ in LineSimulator(SimulatorConfig(devices=8, seed=5, fault_rate_per_hour=20)).take(800)]
    path = tmp_path_factory.mktemp("recording") / "line.avro"
    write_events(path, events[:400] + invalid_events(events[0]) + events[400:])
    return path


@pytest.fixture(scope="module")
def runs(recording, tmp_path_factory) -> dict[str, Path]:
    """The scores of the same recording under each worker variant."""
    out = tmp_path_factory.mktemp("runs")
    return {name: score_file_mode(str(recording), out / f"run{i}", "--calibration_events", "30", *flags)
            for i, (name, flags) in enumerate(WORKER_VARIANTS.items())}


@pytest.mark.slow
def test_file_mode_writes_scores_and_dead_letters_with_file_positions(recording, runs):
    output_dir = runs["one worker"].parent
    assert len(read_avro(runs["one worker"])) == 800
    dead = read_avro(output_dir / "dead-letters-00000-of-00001.avro")
    assert sorted((d["topic"], d["partition"], d["offset"], d["stage"]) for d in dead) == [
        (str(recording), 0, 400, "validate"), (str(recording), 0, 401, "validate")]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in WORKER_VARIANTS if v != "one worker"])
def test_runs_agree_within_float_noise(runs, variant):
    result = compare.compare_files(runs["one worker"], runs[variant])
    assert result.within(FLOAT_NOISE), compare.summary(result, FLOAT_NOISE)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in WORKER_VARIANTS if v != "one worker"])
def test_scores_are_byte_identical_across_runs_and_workers(runs, variant):
    assert canonical_bytes(runs[variant]) == canonical_bytes(runs["one worker"])


@pytest.mark.slow
def test_golden_scores(tmp_path):
    """A change of scores shows here; if it is intended, regenerate the golden file (tests/golden/README.md)."""
    scores = score_file_mode(str(GOLDEN / "recording.avro"), tmp_path, *GOLDEN_OPTIONS)
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(GOLDEN / "scores.avro"), str(scores), "--tolerance", str(FLOAT_NOISE)])
    assert exit_info.value.code == 0, "scores differ from tests/golden/scores.avro: see the summary above"


def test_file_mode_needs_both_options_and_existing_files(tmp_path):
    with pytest.raises(RecordingError, match="--output_dir"):
        sensor_scoring.run(["--input_files", str(tmp_path / "*.avro")])
    with pytest.raises(RecordingError, match="--input_files"):
        sensor_scoring.run(["--output_dir", str(tmp_path)])
    with pytest.raises(RecordingError, match="no file matches"):
        sensor_scoring.run(["--input_files", str(tmp_path / "*.avro"), "--output_dir", str(tmp_path)])
