"""Security: TLS and SASL end to end on Apache Kafka, refusals that say why, pseudonymised ids, audit records.

The session's Apache Kafka (tests/conftest.py) serves TLS itself and
SASL_SSL with SCRAM-SHA-512 users made when its storage was formatted:
``scorer`` with rights on every topic and group, ``outsider`` with none.
The job and every tool run over both listeners, the password coming from
the environment only. (Tansu could do neither: it refuses ``--cert`` with
``--key``, and its memory storage starts with no SASL users.)
"""

from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys
import time

import pytest

from beam_jobs import inspect as inspect_tool
from beam_jobs import local_run, simulator
from beam_jobs.kafka_cluster import OUTSIDER, SCORER, KafkaCluster
from beam_jobs.throwaway_certificates import make_certificates
from beam_jobs.options import SensorScoringOptions, help_parser, kafka_config
from beam_jobs.recordings import read_events, write_events
from beam_jobs.security_options import KAFKA_SECURITY_OPTIONS, kafka_security, kafka_security_argv
from schemas.serde import AUDIT, EVENT, SCORE, AvroDecoder
from tests.kafka_helpers import produce_all, read_all
from tests.test_job import ROOT, _avro, _schema, outside_events, run_job
from transforms.kafka_client import (
    BrokerUnavailable,
    KafkaAuthenticationFailed,
    KafkaConfig,
    KafkaNotAuthorized,
    KafkaSecurity,
    KafkaSecurityError,
    ensure_topics,
    make_admin,
    make_consumer,
)
from transforms.pseudonymize import PSEUDONYM_HEX_CHARS, PseudonymizeKeyMissing, pseudonym, pseudonymizer_from_env

pytestmark = pytest.mark.apache_kafka
PASSWORD = "correct horse battery staple"
LISTENERS = ["SSL", "SASL_SSL"]


def test_sasl_settings_reach_the_clients_and_the_password_stays_in_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KAFKA_PASSWORD", PASSWORD)
    options = SensorScoringOptions([
        "--bootstrap_servers", "127.0.0.1:1", "--security_protocol", "SASL_SSL", "--ssl_cafile", "ca.pem",
        "--sasl_mechanism", "SCRAM-SHA-512", "--sasl_username", "scorer", "--sasl_password_env", "KAFKA_PASSWORD",
    ])
    config = kafka_config(options)
    assert config.client_kwargs() == {
        "bootstrap_servers": ["127.0.0.1:1"], "client_id": "sensor-scoring", "security_protocol": "SASL_SSL",
        "ssl_cafile": "ca.pem", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "scorer",
        "sasl_plain_password": PASSWORD}
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


@pytest.fixture
def secured(kafka_broker: KafkaCluster, monkeypatch):
    """The session's Apache Kafka, with scorer's password in $KAFKA_PASSWORD; flags(listener) for the tools."""
    monkeypatch.setenv("KAFKA_PASSWORD", kafka_broker.passwords[SCORER])

    def flags(listener: str, user: str = SCORER) -> list[str]:
        argv = ["--bootstrap_servers", kafka_broker.bootstrap(listener), "--security_protocol", listener,
                "--ssl_cafile", str(kafka_broker.tls.ca)]
        if listener == "SASL_SSL":
            argv += ["--sasl_mechanism", "SCRAM-SHA-512", "--sasl_username", user, "--sasl_password_env",
                     "KAFKA_PASSWORD"]
        return argv

    kafka_broker.flags = flags
    return kafka_broker


def _secured_config(broker: KafkaCluster, listener: str, user: str = SCORER) -> KafkaConfig:
    return broker.config(listener, user, "KAFKA_PASSWORD")


@pytest.mark.slow
@pytest.mark.parametrize("listener", LISTENERS)
def test_job_scores_over_tls_and_sasl(secured, listener, topic_names):
    config = _secured_config(secured, listener)
    schema = _schema("sensor_event.avsc")
    events = outside_events(devices=3, per_device=20)
    ensure_topics(config, [topic_names("in")], partitions=2)
    produce_all(config, topic_names("in"), [(e["device_id"].encode(), _avro(schema, e), None) for e in events])

    run_job(config, topic_names, *secured.flags(listener)[2:])

    scores = read_all(config, topic_names("scores"), AvroDecoder(SCORE))
    assert sorted(s["event_id"] for *_, s in scores) == sorted(e["event_id"] for e in events)


def test_a_client_trusting_another_ca_gets_no_connection(secured, tmp_path):
    stranger = make_certificates(tmp_path, ca_name="another CA")
    with pytest.raises(BrokerUnavailable):
        make_admin(KafkaConfig(secured.bootstrap("SSL"), security=KafkaSecurity("SSL", ssl_cafile=str(stranger.ca))),
                   timeout_s=3)


def test_a_wrong_password_is_a_clear_error_naming_the_mechanism_and_the_broker(secured, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_PASSWORD", "not the password")
    config = _secured_config(secured, "SASL_SSL")
    expected = (f"the Kafka broker at {secured.bootstrap('SASL_SSL')} refused SASL SCRAM-SHA-512 authentication "
                f"of user 'scorer'")
    started = time.monotonic()
    with pytest.raises(KafkaAuthenticationFailed, match=expected) as refused:
        ensure_topics(config, ["never-created"], timeout_s=30)  # no retries: a wrong password stays wrong
    assert "$KAFKA_PASSWORD" in str(refused.value) and "not the password" not in str(refused.value)
    with pytest.raises(KafkaAuthenticationFailed, match=expected):
        make_consumer(config)  # the tools that start with a consumer: record, inspect
    # Usually 10 s; a client may see only closed connections and tries up to three times (kafka_client._built).
    assert time.monotonic() - started < 120
    assert _exit_code("beam_jobs.inspect", [*secured.flags("SASL_SSL"), "--topic", "any", "--schema", EVENT]) == 2
    assert expected in capsys.readouterr().err


def test_a_user_without_rights_gets_an_authorisation_error_not_a_hang(secured, topic_names, monkeypatch, capsys):
    plain = secured.config()
    ensure_topics(plain, [topic_names("in")], partitions=2)
    produce_all(plain, topic_names("in"), [(b"k", b"v", None)])
    monkeypatch.setenv("KAFKA_PASSWORD", secured.passwords[OUTSIDER])
    outsider = _secured_config(secured, "SASL_SSL", OUTSIDER)
    who = "SASL SCRAM-SHA-512 user 'outsider' is not authorised to"
    started = time.monotonic()
    with pytest.raises(KafkaNotAuthorized, match=f"{who} create or describe topic"):
        ensure_topics(outsider, [topic_names("in")])
    # The job stops at launch with the reason (exit code 2), the tools likewise.
    job = subprocess.run([sys.executable, "-m", "beam_jobs.sensor_scoring", *secured.flags("SASL_SSL", OUTSIDER),
                          "--input_topic", topic_names("in"), "--bounded"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert job.returncode == 2 and f"{who} create or describe topic" in job.stderr, job.stderr[-2000:]
    recorded = ["--topic", topic_names("in"), "--output", "unused.avro"]
    assert _exit_code("beam_jobs.record", [*secured.flags("SASL_SSL", OUTSIDER), *recorded]) == 2
    assert f"{who} describe topic '{topic_names('in')}' at {secured.bootstrap('SASL_SSL')}" in capsys.readouterr().err
    assert time.monotonic() - started < 30


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


@pytest.mark.parametrize("listener", LISTENERS)
def test_tools_replay_record_simulate_and_inspect_over_tls_and_sasl(secured, listener, topic_names, tmp_path, capsys):
    flags = secured.flags(listener)
    original = tmp_path / "original.avro"
    write_events(original, (e for e, _ in simulator.LineSimulator(simulator.SimulatorConfig(devices=3)).take(60)))

    _run_tool("beam_jobs.replay", "--input", str(original), "--topic", topic_names("in"), "--topic_partitions", "2",
              *flags)
    recorded = tmp_path / "recorded.avro"
    assert "wrote 60 events" in _run_tool("beam_jobs.record", "--topic", topic_names("in"), "--output",
                                          str(recorded), *flags)
    by_id = lambda events: sorted(events, key=lambda e: e["event_id"])  # noqa: E731
    assert by_id(read_events(recorded)) == by_id(read_events(original))

    ensure_topics(_secured_config(secured, listener), [topic_names("simulated")], partitions=1)
    simulator.main(["--topic", topic_names("simulated"), "--events", "5", "--devices", "2", *flags])
    capsys.readouterr()
    inspect_tool.main(["--topic", topic_names("simulated"), "--schema", EVENT, "--from-beginning", "--max_records", "5",
                       *flags])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event_id"] for e in printed] == [e["event_id"] for e, _ in simulator.LineSimulator(
        simulator.SimulatorConfig(devices=2)).take(5)]


@pytest.mark.slow
def test_run_local_over_sasl_feeds_and_scores_through_the_job(secured, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", secured.bootstrap("SASL_SSL"))
    # The job can reach this listener only if run_local.sh hands it the flags, and the password variable's name.
    assert local_run.main(["--events", "200", "--devices", "2", "--speed", "200", "--timeout_s", "120",
                           "--log", str(tmp_path / "job.log"), *secured.flags("SASL_SSL")[2:],
                           "--", "--metrics_port", "0"]) == 0, (tmp_path / "job.log").read_text()
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["scores_out"] >= 200 and summary["bootstrap_servers"] == secured.bootstrap("SASL_SSL")


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
