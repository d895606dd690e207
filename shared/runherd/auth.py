"""Who may report what: the tokens that authenticate lifecycle events and heartbeats.

An event's ``source`` is a claim in its body; the token proves it. Each token is an HMAC of the
role, the run and the attempt under a key that only the services hold (it lives in PostgreSQL,
``runherd_keys``, made by ``runherd migrate``; workers never connect there):

* ``worker``: handed to one attempt's worker in its plan (a file, never its environment); it
  signs that attempt's events and heartbeats and nothing else;
* ``launcher``: made by the launcher service for the ``WORKER_EXITED`` it reports; a worker
  cannot derive it from its own.

So a worker can report only for its own attempt, and only as a worker. The check is pure and
works whatever the broker users are (the test suite runs everything as one user). The token
travels in the AMQP header ``x-runherd-token``, never in the body, and dead letters drop it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

TOKEN_HEADER = "x-runherd-token"

WORKER = "worker"
LAUNCHER = "launcher"


@dataclass(frozen=True, repr=False)
class Keys:
    """The services' key, and the one before it while a rotation settles (tokens of workers
    launched before the rotation stay valid)."""

    current: bytes
    previous: bytes | None = None

    def __repr__(self) -> str:  # never print a key
        return "Keys(<redacted>)"


def token(key: bytes, role: str, run_id: str, attempt: int) -> str:
    return hmac.new(key, f"{role}\n{run_id}\n{attempt}".encode(), hashlib.sha256).hexdigest()


def role_of(source: str) -> str | None:
    """The role an event's ``source`` claims: ``worker`` / ``worker:<id>``, or ``launcher``."""
    if source == WORKER or source.startswith(WORKER + ":"):
        return WORKER
    if source == LAUNCHER:
        return LAUNCHER
    return None


def refusal(keys: Keys, role: str | None, run_id: str, attempt: int, presented: object) -> str | None:
    """Why a message claiming ``role`` for (run, attempt) with token ``presented`` is refused;
    None when the token proves the claim."""
    if role is None:
        return "unauthenticated: no such source may publish events"
    if not isinstance(presented, str) or not presented:
        return f"unauthenticated: no {TOKEN_HEADER} header"
    for key in (keys.current, keys.previous):
        if key is not None and hmac.compare_digest(presented.encode(), token(key, role, run_id, attempt).encode()):
            return None
    return f"unauthenticated: the token does not prove source {role} of this run's attempt {attempt}"
