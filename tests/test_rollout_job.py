"""Model rollout in the whole job against the real broker: canary, shadow, the rollout report, hot swap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from beam_jobs import rollout_report, sensor_scoring
from beam_jobs.recordings import write_events
from models.artifact import BUNDLED_MODEL_DIR, load_artifact
from models.rollout import in_canary
from schemas.serde import EVENT, SCORE, AvroDecoder, AvroEncoder
from tests.kafka_helpers import produce_all, read_all
from tests.rollout_helpers import model_variant
from tests.test_job import run_job
from transforms.device_state import DeviceLogic
from transforms.kafka_client import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
START_MS = 1_750_000_000_000
CALIBRATION = 15
BUNDLED_VERSION = load_artifact(BUNDLED_MODEL_DIR).version


def events(devices: int, steps: range) -> list[dict]:
    """Readings with a slow swing and noise; every fourth device's temperature jumps halfway, to give anomalies."""
    rng = np.random.default_rng(steps.start)
    out = []
    for step in steps:
        for d in range(devices):
            readings = {f: float(50 + d + 2 * np.sin(step / 7 + k) + rng.normal(0, 0.3))
                        for k, f in enumerate(load_artifact(BUNDLED_MODEL_DIR).features)}
            if d % 4 == 0 and step > 40:
                readings["temperature"] += 15.0
            out.append({"event_id": f"p{d:02d}-{step}", "device_id": f"p{d:02d}", "event_time": START_MS + step * 1000,
                        "readings": readings})
    return out


def produce_events(kafka_config, topic: str, batch: list[dict]) -> None:
    encode = AvroEncoder(EVENT)
    produce_all(kafka_config, topic, [(e["device_id"].encode(), encode(e), e["event_time"]) for e in batch])


def scores_by_event(kafka_config, topic: str) -> dict[str, dict]:
    scores: dict[str, dict] = {}
    for *_, score in read_all(kafka_config, topic, AvroDecoder(SCORE)):
        assert score["event_id"] not in scores, f"{score['event_id']} scored twice"
        scores[score["event_id"]] = score
    return scores


def without(score: dict, *fields: str) -> dict:
    return {k: v for k, v in score.items() if k not in fields}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {"relabelled": model_variant(root / "relabelled", "relabelled-v2"),
            "retuned": model_variant(root / "retuned", "retuned-v3", cap=6.0, factor=1.2, residual_weight=1.0)}


def test_canary_and_shadow_in_one_run_and_the_rollout_report(kafka_config, topic_names, variants, capsys):
    batch = events(devices=12, steps=range(60))
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    produce_events(kafka_config, topic_names("in"), batch)
    run_job(kafka_config, topic_names, "--calibration_events", str(CALIBRATION))  # the reference: primary only
    reference = scores_by_event(kafka_config, topic_names("scores"))

    rollout = ["--canary_model_dir", str(variants["retuned"]), "--canary_percent", "40",
               "--shadow_model_dir", str(variants["relabelled"]), "--shadow_score_topic", topic_names("shadow")]
    rollout_names = lambda kind: topic_names(f"rollout-{kind}")  # noqa: E731 - same input, fresh outputs
    run_job(kafka_config, lambda kind: topic_names("in") if kind == "in" else rollout_names(kind),
            "--calibration_events", str(CALIBRATION), *rollout)
    scores = scores_by_event(kafka_config, rollout_names("scores"))
    shadow = scores_by_event(kafka_config, topic_names("shadow"))

    assert scores.keys() == shadow.keys() == {e["event_id"] for e in batch}
    canary_devices = {e["device_id"] for e in batch if in_canary(e["device_id"], 40)}
    assert 0 < len(canary_devices) < 12
    for event_id, score in scores.items():
        in_the_canary = score["device_id"] in canary_devices
        assert score["model_version"] == ("retuned-v3" if in_the_canary else BUNDLED_VERSION)
        if not in_the_canary:  # the primary's decisions are untouched by the canary and the shadow
            assert without(score, "processed_at") == without(reference[event_id], "processed_at")
        # The shadow has the primary's weights: it continues the very same device state.
        assert shadow[event_id]["model_version"] == "relabelled-v2"
        assert without(shadow[event_id], "processed_at", "model_version") == \
            without(reference[event_id], "processed_at", "model_version")
    assert any(s["is_anomaly"] for s in scores.values())

    common = ["--bootstrap_servers", kafka_config.bootstrap_servers, "--score_topic", rollout_names("scores"),
              "--shadow_score_topic", topic_names("shadow"), "--json"]
    with pytest.raises(SystemExit) as exit_status:
        rollout_report.main(["shadow", *common, "--min_agreement", "0", "--max_anomaly_rate_delta", "1",
                             "--max_ks", "1"])
    report = json.loads(capsys.readouterr().out)
    assert exit_status.value.code == 0 and report["failures"] == []
    calibrated = [e for e, s in scores.items() if s["score"] != 0.0 and shadow[e]["score"] != 0.0]
    assert report["paired"] == len(calibrated)
    expected_agreement = np.mean([scores[e]["is_anomaly"] == shadow[e]["is_anomaly"] for e in calibrated])
    assert report["agreement"] == pytest.approx(expected_agreement)
    assert report["agreement"] < 1.0  # the canary devices' decisions come from another model

    with pytest.raises(SystemExit) as exit_status:
        rollout_report.main(["shadow", *common, "--min_agreement", "1.0"])
    assert exit_status.value.code == 1 and "agreement" in json.loads(capsys.readouterr().out)["failures"][0]

    with pytest.raises(SystemExit) as exit_status:
        rollout_report.main(["canary", *common, "--max_anomaly_rate_delta", "1", "--max_ks", "1"])
    report = json.loads(capsys.readouterr().out)
    assert exit_status.value.code == 0
    assert (report["baseline"], report["candidate"]) == (BUNDLED_VERSION, "retuned-v3")
    assert report["devices"] == [12 - len(canary_devices), len(canary_devices)]


def _wait_for(condition, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _offline_scores(batch: list[dict]) -> dict[str, float]:
    """What an unswapped job scores: the job's DeviceLogic and head, one device at a time."""
    artifact = load_artifact(BUNDLED_MODEL_DIR)
    logic, head, states, scores = DeviceLogic.for_artifact(artifact, 600_000, CALIBRATION), artifact.head(), {}, {}
    for e in batch:
        step = logic.on_event(states.get(e["device_id"]), e["event_time"], e["readings"], "in", e["device_id"])
        states[e["device_id"]] = step.state
        with torch.no_grad():
            scores[e["event_id"]] = float(head(torch.from_numpy(step.model_input)[None])[0, 0])
    return scores


def test_hot_swap_in_a_running_job_keeps_or_resets_device_state_by_compatibility(kafka_config, topic_names,
                                                                                 tmp_path):
    """A registry folder gets a re-labelled model, then a re-tuned one, while the streaming job runs."""
    registry = tmp_path / "registry"
    model_variant(registry / "v1", "v1")
    phases = [events(devices=4, steps=range(0, 25)), events(devices=4, steps=range(25, 50)),
              events(devices=4, steps=range(50, 75))]
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "beam_jobs.sensor_scoring", "--bootstrap_servers", kafka_config.bootstrap_servers,
             "--input_topic", topic_names("in"), "--score_topic", topic_names("scores"),
             "--dead_letter_topic", topic_names("dead"), "--drift_topic", topic_names("drift"),
             "--consumer_group", topic_names("group"), "--model_dir", str(registry), "--model_poll_s", "0.2",
             "--calibration_events", str(CALIBRATION)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        scored = 0
        for phase, new_model in zip(phases, (None, ("v2", {}), ("v3", {"cap": 6.0}))):
            if new_model:
                model_variant(registry / new_model[0], new_model[0], **new_model[1])
                time.sleep(1.0)  # several polls: the next event sees the new model
            produce_events(kafka_config, topic_names("in"), phase)
            scored += len(phase)
            _wait_for(lambda: len(read_all(kafka_config, topic_names("scores"))) >= scored, 120,
                      f"{scored} scores", log_path)
        assert job.poll() is None, log_path.read_text()
    finally:
        job.send_signal(signal.SIGINT)
        job.wait(timeout=30)

    scores = scores_by_event(kafka_config, topic_names("scores"))
    for phase, version in zip(phases, ("v1", "v2", "v3")):
        assert {scores[e["event_id"]]["model_version"] for e in phase} == {version}
    expected = _offline_scores(phases[0] + phases[1])  # v2 has v1's state signature: the state carried on
    for e in phases[0] + phases[1]:
        assert scores[e["event_id"]]["score"] == pytest.approx(expected[e["event_id"]], rel=1e-6, abs=1e-9)
    first_after_v3 = {}  # v3 is another model: every device recalibrates, scoring 0 without alarms meanwhile
    for e in phases[2]:
        first_after_v3.setdefault(e["device_id"], []).append(scores[e["event_id"]])
    for device_scores in first_after_v3.values():
        assert not any(s["is_anomaly"] for s in device_scores[:CALIBRATION])
        assert all(s["score"] == 0.0 for s in device_scores[:CALIBRATION - 1])  # the last one calibrates
        assert all(s["score"] > 0.0 for s in device_scores[CALIBRATION - 1:])
    assert "model swap in" in log_path.read_text()


def test_file_mode_writes_shadow_scores_and_the_report_reads_them(tmp_path, variants, capsys):
    """Same weights as the primary: the shadow agrees on every decision, so the default gates pass."""
    write_events(tmp_path / "in.avro", events(devices=6, steps=range(60)))
    sensor_scoring.run(["--input_files", str(tmp_path / "in.avro"), "--output_dir", str(tmp_path / "out"),
                        "--calibration_events", str(CALIBRATION), "--shadow_model_dir", str(variants["relabelled"])])
    with pytest.raises(SystemExit) as exit_status:
        rollout_report.main(["shadow", "--scores", str(tmp_path / "out/scores-*.avro"),
                             "--shadow_scores", str(tmp_path / "out/shadow-scores-*.avro")])
    assert exit_status.value.code == 0
    out = capsys.readouterr().out
    assert "decision agreement over" in out and ": 1.0000" in out and out.strip().endswith("PASS")
