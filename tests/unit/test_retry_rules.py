"""Issue 5: the pure retry decision (shared/rules/retries.py), as a table."""

from __future__ import annotations

from typing import Any

import pytest

from runherd.config import RunRetries
from runherd.contract import RetryStrategy
from runherd.rules.retries import backoff, decide, retry_tags

ON = RunRetries(enabled=True, max_retries=2)
NO_STEP = RunRetries(enabled=True, max_retries=2, retry_on_step_failure=False)
OFF = RunRetries(enabled=False, max_retries=5)
DEFAULT = RunRetries()  # enabled, max_retries 0: nothing is retried unless a tag asks
ALL = RunRetries(enabled=True, max_retries=1, retry_strategy="ALL_STEPS")
BACKOFF = RunRetries(enabled=True, max_retries=10, retry_backoff_seconds=2, retry_backoff_max_seconds=10)

STEP, INFRA = "step", "infrastructure"

TABLE: list[tuple[str, dict[str, Any], str | None, int, RunRetries, bool, int, str, float]] = [
    # name, tags, failure kind, failed run's retry number, config -> retry?, new retry number, strategy, delay
    ("step failure, retries left", {}, STEP, 0, ON, True, 1, "FROM_FAILURE", 0),
    ("second retry", {}, STEP, 1, ON, True, 2, "FROM_FAILURE", 0),
    ("max_retries reached", {}, STEP, 2, ON, False, 0, "", 0),
    ("past max_retries", {}, INFRA, 7, ON, False, 0, "", 0),
    ("disabled", {"runherd/max_retries": 3}, INFRA, 0, OFF, False, 0, "", 0),
    ("default config retries nothing", {}, INFRA, 0, DEFAULT, False, 0, "", 0),
    ("tag turns retries on", {"runherd/max_retries": 1}, STEP, 0, DEFAULT, True, 1, "FROM_FAILURE", 0),
    ("dagster spelling", {"dagster/max_retries": "2"}, STEP, 1, DEFAULT, True, 2, "FROM_FAILURE", 0),
    ("runherd spelling wins", {"runherd/max_retries": 0, "dagster/max_retries": 3}, STEP, 0, ON, False, 0, "", 0),
    ("tag 0 turns retries off", {"runherd/max_retries": 0}, INFRA, 0, ON, False, 0, "", 0),
    ("no step retries: step failure", {}, STEP, 0, NO_STEP, False, 0, "", 0),
    ("no step retries: crash limit", {}, INFRA, 0, NO_STEP, True, 1, "FROM_FAILURE", 0),
    ("no step retries: unknown kind", {}, None, 0, NO_STEP, False, 0, "", 0),
    ("unknown kind retried with step retries", {}, None, 0, ON, True, 1, "FROM_FAILURE", 0),
    ("tag turns step retries off", {"runherd/retry_on_step_failure": False}, STEP, 0, ON, False, 0, "", 0),
    (
        "tag turns step retries on",
        {"dagster/retry_on_step_failure": "true"},
        STEP,
        0,
        NO_STEP,
        True,
        1,
        "FROM_FAILURE",
        0,
    ),
    ("strategy from config", {}, STEP, 0, ALL, True, 1, "ALL_STEPS", 0),
    ("strategy tag", {"runherd/retry_strategy": "ALL_STEPS"}, STEP, 0, ON, True, 1, "ALL_STEPS", 0),
    ("dagster strategy tag", {"dagster/retry_strategy": "FROM_FAILURE"}, STEP, 0, ALL, True, 1, "FROM_FAILURE", 0),
    ("bad strategy tag", {"runherd/retry_strategy": "SOME"}, STEP, 0, ON, False, 0, "", 0),
    ("bad max_retries tag", {"runherd/max_retries": "many"}, STEP, 0, ON, False, 0, "", 0),
    ("first backoff", {}, STEP, 0, BACKOFF, True, 1, "FROM_FAILURE", 2),
    ("second backoff doubles", {}, STEP, 1, BACKOFF, True, 2, "FROM_FAILURE", 4),
    ("third backoff doubles", {}, INFRA, 2, BACKOFF, True, 3, "FROM_FAILURE", 8),
    ("backoff capped", {}, STEP, 3, BACKOFF, True, 4, "FROM_FAILURE", 10),
    ("backoff stays capped", {}, STEP, 9, BACKOFF, True, 10, "FROM_FAILURE", 10),
]


@pytest.mark.parametrize(
    ("tags", "kind", "number", "config", "retry", "new_number", "strategy", "delay"),
    [t[1:] for t in TABLE],
    ids=[t[0] for t in TABLE],
)
def test_decide(
    tags: dict[str, Any],
    kind: str | None,
    number: int,
    config: RunRetries,
    retry: bool,
    new_number: int,
    strategy: str,
    delay: float,
) -> None:
    decision = decide(tags, kind, number, config)
    assert decision.retry is retry, decision.reason
    assert decision.reason
    if retry:
        assert decision.retry_number == new_number
        assert decision.strategy is RetryStrategy(strategy)
        assert decision.delay_seconds == delay
        assert f"retry {new_number} of" in decision.reason


def test_reasons_say_why_not() -> None:
    assert "all 2 retries used" in decide({}, STEP, 2, ON).reason
    assert "retry_on_step_failure is false" in decide({}, STEP, 0, NO_STEP).reason
    assert "disabled" in decide({}, STEP, 0, OFF).reason
    assert "infrastructure failure" in decide({}, INFRA, 0, ON).reason


@pytest.mark.parametrize(
    ("number", "base", "cap", "expected"),
    [
        (1, 0, 300, 0),
        (1, 1.5, 300, 1.5),
        (2, 1.5, 300, 3),
        (5, 1, 300, 16),
        (20, 1, 300, 300),
        (10_000, 1, 60, 60),
        (0, 5, 300, 0),
    ],
)
def test_backoff(number: int, base: float, cap: float, expected: float) -> None:
    assert backoff(number, base, cap) == expected


def test_retry_tags_replace_lineage_in_either_spelling() -> None:
    tags = {
        "team": "data",
        "dagster/retry_number": "3",
        "runherd/parent_run_id": "old",
        "dagster/root_run_id": "x",
        "runherd/max_retries": 2,
    }
    out = retry_tags(tags, retry_number=4, parent_run_id="p", root_run_id="r")
    assert out == {
        "team": "data",
        "runherd/max_retries": 2,
        "runherd/retry_number": 4,
        "runherd/parent_run_id": "p",
        "runherd/root_run_id": "r",
    }
    assert "runherd/retry_number" not in retry_tags(tags, retry_number=0, parent_run_id="p", root_run_id="r")
