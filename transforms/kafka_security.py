"""Kafka security: the TLS and SASL settings every client gets, and errors that say who was refused and where.

The settings hold no secret (the SASL password is read from an environment
variable when a client is made), so they can be pickled into DoFns and
logged. kafka-python reports a refused login only as a bootstrap timeout and
an ACL refusal as a bare broker error code; the helpers here turn both into
errors that name the mechanism, the user, the broker and what was refused.
Both errors are KafkaSecurityErrors, which every entry point already reports
as a launch failure (exit code 2).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from kafka.errors import AuthorizationError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaSecurityError(ValueError):
    """Security settings that cannot work; the message names the setting, never a secret."""


class KafkaAuthenticationFailed(KafkaSecurityError):
    """The broker refused the SASL user name and password."""


class KafkaNotAuthorized(KafkaSecurityError):
    """The broker's ACLs do not let this client's principal do what it asked."""


@dataclass(frozen=True)
class KafkaSecurity:
    """TLS and SASL settings for every client.

    It holds no secret, so it can be logged, pickled into DoFns and shipped to
    workers: the SASL password is read from the environment variable named by
    ``sasl_password_env`` each time a client is created, on the worker that
    creates it.
    """

    protocol: str = "PLAINTEXT"
    ssl_cafile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    sasl_mechanism: Optional[str] = None
    sasl_username: Optional[str] = None
    sasl_password_env: Optional[str] = None

    def __post_init__(self) -> None:
        if self.protocol not in SECURITY_PROTOCOLS:
            raise KafkaSecurityError(f"security protocol must be one of {SECURITY_PROTOCOLS}, not {self.protocol!r}")
        if self.uses_sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password_env):
            raise KafkaSecurityError(
                f"{self.protocol} needs --sasl_mechanism, --sasl_username and --sasl_password_env")
        if self.uses_sasl and self.sasl_mechanism not in SASL_MECHANISMS:
            raise KafkaSecurityError(f"SASL mechanism must be one of {SASL_MECHANISMS}, not {self.sasl_mechanism!r}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise KafkaSecurityError("a client certificate needs both --ssl_certfile and --ssl_keyfile")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol.endswith("SSL")

    def client_kwargs(self) -> dict:
        """kafka-python's security settings; reads the SASL password from the environment now."""
        kwargs: dict = {"security_protocol": self.protocol}
        if self.uses_tls:
            files = {"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile}
            kwargs.update({name: path for name, path in files.items() if path})
        if self.uses_sasl:
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=secret_from_env(self.sasl_password_env))
        return kwargs


def secret_from_env(name: str) -> str:
    """The value of environment variable `name`; an error that names the variable, not a value, if unset."""
    value = os.environ.get(name)
    if not value:
        raise KafkaSecurityError(f"environment variable {name} is not set or empty")
    return value


def principal(protocol: str, mechanism: Optional[str], username: Optional[str]) -> str:
    """Who the broker sees, for error messages: the SASL user and mechanism, or the anonymous principal."""
    if protocol.startswith("SASL_"):
        return f"SASL {mechanism} user {username!r}"
    return f"the anonymous {protocol} principal"


def not_authorized(who: str, action: str, servers: str, error: str) -> KafkaNotAuthorized:
    return KafkaNotAuthorized(f"{who} is not authorised to {action} at {servers} ({error}); "
                              "the cluster's administrator must grant it an ACL")


@contextmanager
def explain_denials(servers: str, security: KafkaSecurity, action: str) -> Iterator[None]:
    """Turns the broker's authorisation errors inside the block into one that says who may not do what, and where."""
    try:
        yield
    except AuthorizationError as e:
        who = principal(security.protocol, security.sasl_mechanism, security.sasl_username)
        raise not_authorized(who, action, servers, type(e).__name__) from e


class _RefusedLogins(logging.Handler):
    """Keeps the first refused SASL login that kafka-python logs.

    kafka-python retries a refused login until its bootstrap times out, then
    raises a timeout that only says it could not bootstrap; the reason is in
    its error log, which this handler reads while a client is being made.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reason: Optional[str] = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.reason is None and "SaslAuthenticationFailedError" in message:
            self.reason = message.rsplit("SaslAuthenticationFailedError: ", 1)[-1].rstrip(")")


@contextmanager
def refused_logins() -> Iterator[_RefusedLogins]:
    """Collects, while the block runs, why the broker refused a SASL login (``.reason``; None if it did not)."""
    handler = _RefusedLogins()
    logger = logging.getLogger("kafka")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def login_refused(servers: str, security: KafkaSecurity, reason: str) -> KafkaAuthenticationFailed:
    return KafkaAuthenticationFailed(
        f"the Kafka broker at {servers} refused SASL {security.sasl_mechanism} authentication of user "
        f"{security.sasl_username!r} ({reason}); check --sasl_username and the password in "
        f"${security.sasl_password_env}")
