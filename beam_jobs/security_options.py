"""The Kafka security flags, one definition for the job and every tool that connects to Kafka.

The job lists them in its ``--help`` through ``beam_jobs.options``; the
command-line tools (record, replay, inspect, simulator, run_local.sh) add
them with :func:`add_kafka_security_arguments`. They live here, not in
``beam_jobs.options``, because that module loads Beam and torch: the tools
would start in seconds instead of a fraction of one.
"""

from __future__ import annotations

import argparse
from typing import Any

from transforms.kafka_client import SASL_MECHANISMS, SECURITY_PROTOCOLS, KafkaSecurity

# (flag, KafkaSecurity field, argparse keywords). No value here is a secret:
# the password is given as the name of an environment variable.
KAFKA_SECURITY_OPTIONS: list[tuple[str, str, dict]] = [
    ("--security_protocol", "protocol", dict(
        choices=SECURITY_PROTOCOLS, default="PLAINTEXT", help="how every Kafka client connects (default PLAINTEXT)")),
    ("--ssl_cafile", "ssl_cafile", dict(
        default=None, help="PEM file of the CA(s) that signed the brokers' certificates (default: system CAs)")),
    ("--ssl_certfile", "ssl_certfile", dict(
        default=None, help="PEM client certificate, for brokers that require mTLS")),
    ("--ssl_keyfile", "ssl_keyfile", dict(default=None, help="PEM private key of --ssl_certfile")),
    ("--sasl_mechanism", "sasl_mechanism", dict(
        choices=SASL_MECHANISMS, default=None, help="SASL mechanism, with SASL_PLAINTEXT or SASL_SSL")),
    ("--sasl_username", "sasl_username", dict(default=None, help="SASL user name")),
    ("--sasl_password_env", "sasl_password_env", dict(
        default=None,
        help="NAME of the environment variable that holds the SASL password, read on each worker when it "
             "connects; the password itself never appears in options, command lines or logs")),
]


def add_kafka_security_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the job's Kafka security flags to a tool, so every client reaches a secured cluster the same way."""
    group = parser.add_argument_group("Kafka security", "the same flags as python -m beam_jobs.sensor_scoring")
    for flag, _, kwargs in KAFKA_SECURITY_OPTIONS:
        group.add_argument(flag, **kwargs)


def kafka_security(values: Any) -> KafkaSecurity:
    """The KafkaSecurity of parsed flags (an argparse Namespace or the job's options).

    Raises:
        KafkaSecurityError: The flags cannot work together (KafkaSecurity checks them).
    """
    return KafkaSecurity(**{field: getattr(values, flag[2:]) for flag, field, _ in KAFKA_SECURITY_OPTIONS})


def kafka_security_argv(security: KafkaSecurity) -> list[str]:
    """The flags that give a child process (run_local.sh's job) the same security; no secret among them."""
    argv: list[str] = []
    for flag, field, _ in KAFKA_SECURITY_OPTIONS:
        value = getattr(security, field)
        if value is not None:
            argv += [flag, value]
    return argv
