"""Security: TLS and SASL settings on every client, pseudonymised device ids, audit records.

TLS runs the whole job against the real broker behind a TLS front (see
tests/tls_helpers.py for why a front). SASL cannot be run end to end here:
Tansu 0.6.0 with ``--authentication`` only knows users created through an
authenticated connection, and its in-memory storage starts with none, so
the SASL test checks that real kafka-python clients are built with the
settings, the password coming from the environment only.
"""

from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys

import pytest

from beam_jobs import inspect as inspect_tool
from beam_jobs import local_run, simulator
from beam_jobs.embedded_broker import EmbeddedBroker, free_port
from beam_jobs.options import SensorScoringOptions, help_parser, kafka_config
from beam_jobs.recordings import read_events, write_events
from beam_jobs.security_options import KAFKA_SECURITY_OPTIONS, kafka_security, kafka_security_argv
from schemas.serde import AUDIT, EVENT, SCORE, AvroDecoder
from tests.kafka_helpers import produce_all, read_all
from tests.test_job import ROOT, _avro, _schema, outside_events, run_job
from tests.tls_helpers import TlsFront, make_certificates
from transforms.kafka_client import (
    BrokerUnavailable,
    KafkaConfig,
    KafkaSecurity,
    KafkaSecurityError,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
)
from transforms.pseudonymize import PSEUDONYM_HEX_CHARS, PseudonymizeKeyMissing, pseudonym, pseudonymizer_from_env

PASSWORD = "correct horse battery staple"


def test_sasl_settings_reach_real_clients_and_the_password_stays_in_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KAFKA_PASSWORD", PASSWORD)
    options = SensorScoringOptions([
        "--bootstrap_servers", "127.0.0.1:1", "--security_protocol", "SASL_SSL", "--ssl_cafile", "ca.pem",
        "--sasl_mechanism", "SCRAM-SHA-512", "--sasl_username", "scorer", "--sasl_password_env", "KAFKA_PASSWORD",
    ])
    config = kafka_config(options)
    # api_version given: the clients are built without a broker to talk to.
    consumer = make_consumer(config, api_version=(3, 9))
    producer = make_producer(config, api_version=(3, 9))
    try:
        for client in (consumer, producer):
            assert client.config["security_protocol"] == "SASL_SSL"
            assert client.config["ssl_cafile"] == "ca.pem"
            assert client.config["sasl_mechanism"] == "SCRAM-SHA-512"
            assert client.config["sasl_plain_username"] == "scorer"
            assert client.config["sasl_plain_password"] == PASSWORD
    finally:
        consumer.close()
        producer.close(timeout=0)
    for shipped in (repr(config), repr(options), str(options.get_all_options())):
        assert PASSWORD not in shipped
    assert PASSWORD.encode() not in pickle.dumps(config)

    monkeypatch.delenv("KAFKA_PASSWORD")
    with pytest.raises(KafkaSecurityError, match="KAFKA_PASSWORD is not set"):
        config.client_kwargs()


@pytest.mark.parametrize("settings, message", [
    (dict(protocol="TLS"), "security protocol must be one of"),
    (dict(protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u"), "needs --sasl_mechanism"),
    (dict(protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password_env="P"), "GSSAPI"),
    (dict(protocol="SSL", ssl_certfile="client.pem"), "needs both --ssl_certfile and --ssl_keyfile"),
])
def test_security_settings_that_cannot_work_are_refused_at_launch(settings, message):
    with pytest.raises(KafkaSecurityError, match=message):
        KafkaSecurity(**settings)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """A broker reachable only over TLS, and the certificate files its clients need."""
    files = make_certificates(tmp_path_factory.mktemp("tls"))
    front_port = free_port()
    with EmbeddedBroker(advertised_port=front_port) as broker, TlsFront(front_port, broker.port, files):
        yield f"127.0.0.1:{front_port}", files


@pytest.mark.slow
def test_job_scores_over_tls(tls_broker, topic_names, tmp_path):
    bootstrap, files = tls_broker
    tls = KafkaConfig(bootstrap, security=KafkaSecurity("SSL", ssl_cafile=str(files.ca)))
    schema = _schema("sensor_event.avsc")
    events = outside_events(devices=3, per_device=20)
    ensure_topics(tls, [topic_names("in")], partitions=2)
    produce_all(tls, topic_names("in"), [(e["device_id"].encode(), _avro(schema, e), None) for e in events])

    run_job(tls, topic_names, "--security_protocol", "SSL", "--ssl_cafile", str(files.ca))

    scores = read_all(tls, topic_names("scores"), AvroDecoder(SCORE))
    assert sorted(s["event_id"] for *_, s in scores) == sorted(e["event_id"] for e in events)
    # The CA is checked: a client trusting another CA gets no connection.
    stranger = make_certificates(tmp_path, ca_name="another CA")
    with pytest.raises(BrokerUnavailable):
        make_admin(KafkaConfig(bootstrap, security=KafkaSecurity("SSL", ssl_cafile=str(stranger.ca))), timeout_s=3)


# Every command-line tool that connects to Kafka; each takes the job's security flags.
KAFKA_TOOLS = ["beam_jobs.record", "beam_jobs.replay", "beam_jobs.inspect", "beam_jobs.simulator",
               "beam_jobs.local_run"]


def _exit_code(module: str, argv: list[str]) -> int:
    """A tool's exit status when run in-process: local_run returns it, the others exit with it."""
    try:
        return importlib.import_module(module).main(argv) or 0
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("module", [*KAFKA_TOOLS, "beam_jobs.sensor_scoring"])
def test_every_tool_lists_the_jobs_security_flags_in_help(module, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    if module == "beam_jobs.sensor_scoring":  # its main --help also reconfigures logging
        out = help_parser(module, "").format_help()
    else:
        assert _exit_code(module, ["--help"]) == 0
        out = capsys.readouterr().out
    text = " ".join(out.split())
    for flag, _, kwargs in KAFKA_SECURITY_OPTIONS:
        assert flag in text and " ".join(kwargs["help"].split()) in text, f"{module} --help: {flag}"


@pytest.mark.parametrize("module, required", [
    ("beam_jobs.record", ["--output", "unused.avro"]), ("beam_jobs.replay", ["--input", "unused.avro"]),
    ("beam_jobs.inspect", []), ("beam_jobs.simulator", []), ("beam_jobs.local_run", []),
])
def test_every_tool_refuses_security_flags_that_cannot_work(module, required, capsys):
    incomplete_sasl = ["--security_protocol", "SASL_SSL", "--sasl_mechanism", "PLAIN", "--sasl_username", "u"]
    assert _exit_code(module, [*required, *incomplete_sasl]) == 2
    assert "SASL_SSL needs --sasl_mechanism, --sasl_username and --sasl_password_env" in capsys.readouterr().err


def test_run_local_passes_its_security_flags_to_the_job_without_the_password(monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_PASSWORD", PASSWORD)
    sasl = ["--security_protocol", "SASL_SSL", "--ssl_cafile", "ca.pem", "--sasl_mechanism", "SCRAM-SHA-256",
            "--sasl_username", "scorer", "--sasl_password_env", "KAFKA_PASSWORD"]
    args, job_args = local_run._parse_args([*sasl, "--events", "10", "--", "--calibration_events", "30"])
    security = kafka_security(args)
    job_argv = kafka_security_argv(security)
    assert PASSWORD not in " ".join(job_argv) and job_args == ["--calibration_events", "30"]
    assert kafka_config(SensorScoringOptions(job_argv)).security == security
    # After --, the flags would reach the job only; the tool's own clients would connect without them.
    with pytest.raises(SystemExit):
        local_run._parse_args(["--", "--security_protocol=SSL"])
    assert "give --security_protocol before --" in capsys.readouterr().err
    monkeypatch.delenv("KAFKA_PASSWORD")
    assert local_run.main(sasl) == 2
    assert "KAFKA_PASSWORD is not set" in capsys.readouterr().err


def _run_tool(module: str, *args: str) -> str:
    """Runs a tool as a user does, in its own process; its stderr, after checking it succeeded."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_tools_replay_record_simulate_and_inspect_over_tls(tls_broker, topic_names, tmp_path, capsys):
    bootstrap, files = tls_broker
    tls_flags = ["--bootstrap_servers", bootstrap, "--security_protocol", "SSL", "--ssl_cafile", str(files.ca)]
    original = tmp_path / "original.avro"
    write_events(original, (e for e, _ in simulator.LineSimulator(simulator.SimulatorConfig(devices=3)).take(60)))

    _run_tool("beam_jobs.replay", "--input", str(original), "--topic", topic_names("in"), "--topic_partitions", "2",
              *tls_flags)
    recorded = tmp_path / "recorded.avro"
    assert "wrote 60 events" in _run_tool("beam_jobs.record", "--topic", topic_names("in"), "--output",
                                          str(recorded), *tls_flags)
    by_id = lambda events: sorted(events, key=lambda e: e["event_id"])  # noqa: E731
    assert by_id(read_events(recorded)) == by_id(read_events(original))

    tls = KafkaConfig(bootstrap, security=KafkaSecurity("SSL", ssl_cafile=str(files.ca)))
    ensure_topics(tls, [topic_names("simulated")], partitions=1)
    simulator.main(["--topic", topic_names("simulated"), "--events", "5", "--devices", "2", *tls_flags])
    capsys.readouterr()
    inspect_tool.main(["--topic", topic_names("simulated"), "--schema", EVENT, "--from-beginning", "--max_records", "5",
                  *tls_flags])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event_id"] for e in printed] == [e["event_id"] for e, _ in simulator.LineSimulator(
        simulator.SimulatorConfig(devices=2)).take(5)]


@pytest.mark.slow
def test_run_local_over_tls_feeds_and_scores_through_the_job(tls_broker, tmp_path, monkeypatch, capsys):
    bootstrap, files = tls_broker
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    # The job can reach this broker only if run_local.sh hands it the flags.
    assert local_run.main(["--events", "200", "--devices", "2", "--speed", "200", "--timeout_s", "120",
                           "--log", str(tmp_path / "job.log"), "--security_protocol", "SSL", "--ssl_cafile",
                           str(files.ca), "--", "--metrics_port", "0"]) == 0, (tmp_path / "job.log").read_text()
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["scores_out"] >= 200 and summary["bootstrap_servers"] == bootstrap


def test_pseudonyms_are_keyed_hmacs_and_need_their_key(monkeypatch):
    monkeypatch.setenv("PSEUDO_KEY", "k1")
    with_k1 = pseudonymizer_from_env("PSEUDO_KEY")
    assert with_k1("press-7") == pseudonym(b"k1", "press-7") != pseudonym(b"k2", "press-7")
    assert with_k1("press-7") != with_k1("press-8")
    assert len(with_k1("press-7")) == PSEUDONYM_HEX_CHARS and int(with_k1("press-7"), 16) >= 0
    assert pseudonymizer_from_env(None) is None
    monkeypatch.delenv("PSEUDO_KEY")
    with pytest.raises(PseudonymizeKeyMissing, match="PSEUDO_KEY"):
        pseudonymizer_from_env("PSEUDO_KEY")


@pytest.mark.slow
def test_outputs_carry_only_pseudonyms_and_anomalies_are_audited(kafka_config, topic_names, monkeypatch):
    monkeypatch.setenv("PSEUDO_KEY", "fleet-secret")
    schema = _schema("sensor_event.avsc")
    events = outside_events(devices=3, per_device=80)
    for event in events[-15:]:  # the last five events of each device: a fault far outside any baseline
        event["readings"] = {**event["readings"], "temperature": 400.0, "vibration": -300.0}
    ensure_topics(kafka_config, [topic_names("in")], partitions=2)
    produce_all(kafka_config, topic_names("in"), [(e["device_id"].encode(), _avro(schema, e), None) for e in events])

    run_job(kafka_config, topic_names, "--calibration_events", "30", "--pseudonymize_key_env", "PSEUDO_KEY",
            "--audit_topic", topic_names("audit"))

    raw_ids = {e["device_id"] for e in events}
    # Event ids embed device ids here ("dev01-17"), so they are pseudonymised too.
    expected = {pseudonym(b"fleet-secret", e["event_id"]): pseudonym(b"fleet-secret", e["device_id"]) for e in events}
    score_bytes = read_all(kafka_config, topic_names("scores"))
    audit_bytes = read_all(kafka_config, topic_names("audit"))
    for *_, key, value in score_bytes + audit_bytes:
        assert not any(raw.encode() in key or raw.encode() in value for raw in raw_ids)
    scores = [AvroDecoder(SCORE)(value) for *_, value in score_bytes]
    assert {s["event_id"]: s["device_id"] for s in scores} == expected

    audits = {a["event_id"]: a for a in (AvroDecoder(AUDIT)(value) for *_, value in audit_bytes)}
    anomalies = {s["event_id"]: s for s in scores if s["is_anomaly"]}
    assert anomalies and set(audits) == set(anomalies)
    inputs = {pseudonym(b"fleet-secret", e["event_id"]): e for e in events}
    for event_id, audit in audits.items():
        assert audit["readings"] == inputs[event_id]["readings"]
        assert audit["device_id"] == expected[event_id]
        assert (audit["score"], audit["model_version"]) == (anomalies[event_id]["score"],
                                                             anomalies[event_id]["model_version"])
    assert all(key == AvroDecoder(AUDIT)(value)["device_id"].encode() for _, _, key, value in audit_bytes)
