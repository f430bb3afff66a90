"""python -m beam_jobs.inspect against the real broker: schema by topic name, explicit schema, bad bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from schemas.serde import DRIFT, AvroEncoder
from tests.kafka_helpers import produce_all
from transforms.kafka_client import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
STATS = {"window_start": 0, "window_end": 60_000, "feature": "pressure", "count": 1200, "missing_rate": 0.0,
         "mean": 4.1, "std": 1.3, "reference_mean": 4.3, "reference_std": 1.6, "psi": 7.9, "ks_statistic": 0.9,
         "ks_pvalue": 1e-20, "drift": True, "model_version": "v1"}


def inspect(*args: str) -> list[str]:
    command = [sys.executable, "-m", "beam_jobs.inspect", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_prints_drift_records_as_json_lines_by_topic_name_and_by_schema(kafka_config, topic_names):
    ensure_topics(kafka_config, ["sensor-drift", topic_names("drift")], partitions=1)
    messages = [(b"pressure", AvroEncoder(DRIFT)(STATS), 60_000), (b"x", b"\x01garbage", 60_000)]
    produce_all(kafka_config, "sensor-drift", messages)
    produce_all(kafka_config, topic_names("drift"), messages)
    by_name = inspect("--bootstrap_servers", kafka_config.bootstrap_servers, "--topic", "sensor-drift",
                      "--from-beginning", "--max_records", "2")
    by_schema = inspect("--bootstrap_servers", kafka_config.bootstrap_servers, "--topic", topic_names("drift"),
                        "--schema", DRIFT, "--from-beginning", "--max_records", "2")
    for lines in (by_name, by_schema):
        first, second = map(json.loads, lines)
        assert first == STATS
        assert "undecodable" in second


def test_unknown_topic_without_schema_is_a_usage_error(kafka_config):
    done = subprocess.run([sys.executable, "-m", "beam_jobs.inspect", "--topic", "elsewhere"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "pass --schema" in done.stderr
