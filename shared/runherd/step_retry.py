"""Step retry policies, as Dagster's ``RetryPolicy``: parsing, the run-level default, the delay.

Pure: no I/O, no clock of its own (time and randomness are inputs). A step carries
``retry: {max_retries, delay_seconds, backoff, jitter}``; a run's default comes from the tag
``runherd/step_retry`` or the config's ``execution.step_retry``; a step's own policy wins.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import orjson

from runherd.errors import InvalidMessage

MAX_RETRIES_LIMIT = 100
MAX_DELAY_SECONDS = 86_400.0
STEP_RETRY_TAG = "step_retry"  # runherd/step_retry (or dagster/step_retry)


class Backoff(enum.StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


class Jitter(enum.StrEnum):
    FULL = "full"
    PLUS_MINUS = "plus_minus"


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 1  # Dagster's default
    delay_seconds: float = 0.0
    backoff: Backoff = Backoff.CONSTANT
    jitter: Jitter | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "delay_seconds": self.delay_seconds,
            "backoff": self.backoff.value,
            "jitter": self.jitter.value if self.jitter is not None else None,
        }

    @property
    def max_tries(self) -> int:
        return self.max_retries + 1


NO_RETRY = RetryPolicy(max_retries=0)

_FIELDS = ("max_retries", "delay_seconds", "backoff", "jitter")


def _enum(kind: type[enum.StrEnum], value: Any, what: str) -> Any:
    # Dagster spells them Backoff.EXPONENTIAL, Jitter.PLUS_MINUS: both cases are taken.
    if isinstance(value, str) and value.lower() in kind._value2member_map_ and value in (value.lower(), value.upper()):
        return kind(value.lower())
    names = " | ".join(m.value for m in kind)
    raise InvalidMessage(f"{what}: expected {names}, got {value!r}")


def parse_policy(raw: Any, where: str) -> RetryPolicy:
    """``{max_retries, delay_seconds, backoff, jitter}``, every field optional."""
    if not isinstance(raw, dict):
        fields = "{max_retries, delay_seconds, backoff, jitter}"
        raise InvalidMessage(f"{where}: expected an object {fields}, got {raw!r}")
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise InvalidMessage(f"{where}.{sorted(unknown)[0]}: unknown field")
    max_retries = raw.get("max_retries", 1)
    if isinstance(max_retries, float) and max_retries.is_integer():
        max_retries = int(max_retries)  # 1.0 is an integer to JSON Schema
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= MAX_RETRIES_LIMIT:
        raise InvalidMessage(
            f"{where}.max_retries: expected an integer from 0 to {MAX_RETRIES_LIMIT}, got {max_retries!r}"
        )
    delay = raw.get("delay_seconds", 0)
    delay = 0 if delay is None else delay
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_DELAY_SECONDS:
        raise InvalidMessage(f"{where}.delay_seconds: expected a number from 0 to {MAX_DELAY_SECONDS:g}, got {delay!r}")
    backoff = raw.get("backoff")
    jitter = raw.get("jitter")
    return RetryPolicy(
        max_retries=max_retries,
        delay_seconds=float(delay),
        backoff=Backoff.CONSTANT if backoff is None else _enum(Backoff, backoff, f"{where}.backoff"),
        jitter=None if jitter is None else _enum(Jitter, jitter, f"{where}.jitter"),
    )


_INT_TEXT = re.compile(r"[0-9]{1,3}")


def parse_tag(value: Any, where: str = "tag runherd/step_retry") -> RetryPolicy | None:
    """The run-level default: a number of retries (``3``, ``"3"``), or the policy as an object or as
    JSON text (``--tag 'runherd/step_retry={"max_retries": 2, "delay_seconds": 5}'``)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            value = int(text)
        else:
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise InvalidMessage(
                    f"{where}: expected a number of retries or a policy object, got {value!r}"
                ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_policy({"max_retries": value}, where)
    return parse_policy(value, where)


def effective(
    own: RetryPolicy | None, run_default: RetryPolicy | None, config_default: RetryPolicy | None
) -> RetryPolicy:
    """A step's own policy, else the run's tag, else the config's, else no retries."""
    for policy in (own, run_default, config_default):
        if policy is not None:
            return policy
    return NO_RETRY


def delay_seconds(policy: RetryPolicy, retry_number: int, rand: float) -> float:
    """Seconds to wait before retry ``retry_number`` (1 for the first retry), as Dagster's
    ``calculate_delay``: constant ``d``; linear ``d * n``; exponential ``d * (2**n - 1)``. Jitter
    ``full`` draws in ``[0, delay)``; ``plus_minus`` adds ``[-d, +d)``. ``rand`` is in [0, 1)."""
    base = policy.delay_seconds
    if policy.backoff is Backoff.EXPONENTIAL:
        delay = base * (2**retry_number - 1)
    elif policy.backoff is Backoff.LINEAR:
        delay = base * retry_number
    else:
        delay = base
    if policy.jitter is Jitter.FULL:
        delay = rand * delay
    elif policy.jitter is Jitter.PLUS_MINUS:
        delay = delay + (2 * rand * base - base)
    return min(max(0.0, delay), MAX_DELAY_SECONDS)


@dataclass(frozen=True)
class NextTry:
    """What follows a failed try: another one after ``delay`` seconds, or the step fails."""

    retry: bool
    next_try: int = 0
    delay: float = 0.0


def after_failure(policy: RetryPolicy, failed_try: int, rand: float) -> NextTry:
    """``failed_try`` counts from 1. A try that is the step's last (``max_retries + 1``) ends it."""
    if failed_try >= policy.max_tries:
        return NextTry(retry=False)
    return NextTry(retry=True, next_try=failed_try + 1, delay=delay_seconds(policy, failed_try, rand))


def remaining_delay(retry_at: float | None, now: float) -> float:
    """A resumed attempt waits out what is left of a delay begun before the crash (epoch seconds)."""
    if retry_at is None:
        return 0.0
    return max(0.0, min(retry_at - now, MAX_DELAY_SECONDS))
