"""Whether a failed run is retried, how, and after how long: a pure decision (no I/O).

Dagster's run retries: the tags ``runherd/max_retries``, ``runherd/retry_strategy`` and
``runherd/retry_on_step_failure`` (or their ``dagster/`` spellings) override the ``run_retries``
config for one run. A step failure (the worker reported RUN_FAILURE) is retried only while
``retry_on_step_failure`` holds; an infrastructure failure (crash limit, start timeout, max runtime,
launch failure) always is, while retries are left. The n-th retry waits
``retry_backoff_seconds * 2 ** (n - 1)``, at most ``retry_backoff_max_seconds``, after the failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runherd import contract
from runherd.config import RunRetries
from runherd.contract import RetryStrategy
from runherd.errors import InvalidMessage

STEP = "step"
INFRASTRUCTURE = "infrastructure"


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    reason: str  # a sentence for the failed run's event log
    retry_number: int = 0  # the new run's, when retried
    strategy: RetryStrategy = RetryStrategy.FROM_FAILURE
    delay_seconds: float = 0.0
    max_retries: int = 0


def backoff(retry_number: int, base: float, cap: float) -> float:
    """Seconds the ``retry_number``-th retry (1, 2, ...) waits: exponential, capped."""
    if base <= 0 or retry_number < 1:
        return 0.0
    # The exponent is bounded so a long chain cannot overflow the float before the cap applies.
    return float(min(cap, base * 2 ** min(retry_number - 1, 62)))


def decide(tags: dict[str, Any], failure_kind: str | None, retry_number: int, config: RunRetries) -> RetryDecision:
    """The decision for a run that just failed. ``retry_number`` is the failed run's own (0 for
    an original run). An unknown ``failure_kind`` counts as a step failure: it is retried only
    when step failures are."""
    if not config.enabled:
        return RetryDecision(False, "run retries are disabled (run_retries.enabled: false)")
    try:
        max_retries = _int(tags, "max_retries")
        on_step = _bool(tags, "retry_on_step_failure")
    except InvalidMessage as exc:
        return RetryDecision(False, f"not retried: {exc}")
    max_retries = config.max_retries if max_retries is None else max_retries
    on_step = config.retry_on_step_failure if on_step is None else on_step
    strategy_raw = contract.tag(tags, "retry_strategy") or config.retry_strategy
    if strategy_raw not in RetryStrategy.__members__:
        return RetryDecision(
            False, f"not retried: tag runherd/retry_strategy {strategy_raw!r} is not FROM_FAILURE or ALL_STEPS"
        )
    strategy = RetryStrategy(strategy_raw)
    if max_retries <= 0:
        return RetryDecision(False, "not retried: max_retries is 0")
    if retry_number >= max_retries:
        return RetryDecision(False, f"not retried: all {max_retries} retries used", max_retries=max_retries)
    if failure_kind != INFRASTRUCTURE and not on_step:
        return RetryDecision(
            False, "not retried: a step failed and retry_on_step_failure is false", max_retries=max_retries
        )
    number = retry_number + 1
    delay = backoff(number, config.retry_backoff_seconds, config.retry_backoff_max_seconds)
    kind = "infrastructure failure" if failure_kind == INFRASTRUCTURE else "step failure"
    return RetryDecision(
        True,
        f"{kind}: retry {number} of {max_retries} ({strategy.value}) in {delay:g} s",
        retry_number=number,
        strategy=strategy,
        delay_seconds=delay,
        max_retries=max_retries,
    )


def _int(tags: dict[str, Any], name: str) -> int | None:
    value = contract.tag(tags, name)
    if value is None:
        return None
    if not isinstance(value, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    raise InvalidMessage(f"tag runherd/{name}: expected an integer, got {value!r}")


def _bool(tags: dict[str, Any], name: str) -> bool | None:
    value = contract.tag(tags, name)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidMessage(f"tag runherd/{name}: expected true or false, got {value!r}")


RETRY_TAGS = ("retry_number", "parent_run_id", "root_run_id")


def retry_tags(tags: dict[str, Any], *, retry_number: int, parent_run_id: str, root_run_id: str) -> dict[str, Any]:
    """The new run's tags: the origin's, with its lineage tags replaced in the ``runherd/`` spelling."""
    out = {k: v for k, v in tags.items() if not any(k == p + n for p in contract.TAG_PREFIXES for n in RETRY_TAGS)}
    if retry_number:
        out["runherd/retry_number"] = retry_number
    out["runherd/parent_run_id"] = parent_run_id
    out["runherd/root_run_id"] = root_run_id
    return out
