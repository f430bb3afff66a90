"""Keyed pseudonyms for device ids, so no output of the job carries a raw id.

With ``--pseudonymize_key_env NAME`` the decode stage replaces each valid
event's device_id (and event_id, often built from it) by
``HMAC-SHA256(key, id)`` as hex, truncated to
:data:`PSEUDONYM_HEX_CHARS` characters (128 bits: collisions are negligible
for any fleet, and the id stays short as a Kafka key and a state key). The
same key gives the same pseudonym on every run and worker, so per-device
state, scores, drift and audit records stay joinable by whoever holds the
key, and by no one else. The key is read from the environment on the worker
when the decoder is set up; it is never part of the pipeline's options or of
a pickled DoFn.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Callable, Optional

PSEUDONYM_HEX_CHARS = 32

Pseudonymizer = Callable[[str], str]


class PseudonymizeKeyMissing(ValueError):
    """--pseudonymize_key_env names a variable that is unset or empty on this machine."""


def pseudonym(key: bytes, device_id: str) -> str:
    """The pseudonym of one device id under `key`."""
    digest = hmac.new(key, device_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX_CHARS]


def pseudonymizer_from_env(env_name: Optional[str]) -> Optional[Pseudonymizer]:
    """A device-id pseudonymizer keyed by environment variable `env_name`; None when `env_name` is None."""
    if env_name is None:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise PseudonymizeKeyMissing(
            f"--pseudonymize_key_env names {env_name}, but that environment variable is not set or empty")
    key_bytes = key.encode("utf-8")
    return lambda device_id: pseudonym(key_bytes, device_id)
