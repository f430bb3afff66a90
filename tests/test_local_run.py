"""run_local.sh on each broker it can start: Tansu (the default) and Apache Kafka (--broker kafka)."""

from __future__ import annotations

import json

import pytest

from beam_jobs import local_run


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["tansu", "kafka"])
def test_run_local_starts_its_broker_feeds_and_scores(broker, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.chdir(tmp_path)  # Apache Kafka's data and logs go to out/kafka here
    assert local_run.main(["--broker", broker, "--events", "200", "--devices", "2", "--speed", "200",
                           "--timeout_s", "120", "--log", str(tmp_path / "job.log"),
                           "--", "--metrics_port", "0"]) == 0, (tmp_path / "job.log").read_text()[-3000:]
    out = capsys.readouterr().out
    started = {"tansu": "started the embedded Tansu broker", "kafka": "started the Apache Kafka broker"}[broker]
    assert started in out
    assert json.loads(out.splitlines()[-1])["scores_out"] >= 200
    if broker == "kafka":
        assert "Kafka Server started" in (tmp_path / "out" / "kafka" / "node-1" / "server.log").read_text()
