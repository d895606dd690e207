"""Which rules a sweep runs and how long it then sleeps (shared/rules/sweeps.py), decided from the
rule deadlines alone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from runherd.rules.sweeps import (
    PASS_MAX_AGE,
    PAST_DEADLINE,
    SETTLED_SECONDS,
    SHORTEST_SLEEP,
    Deadlines,
    StartedPass,
    due_rules,
    is_deaf,
    keep_pass,
    reuse_pass,
    sleep_seconds,
)

HEARD = 0.3  # the workers are heard 0.3 s behind
TIMEOUT = 30.0


def test_nothing_in_flight_runs_no_rule_and_sleeps_the_ceiling() -> None:
    quiet = Deadlines(heard_lag=HEARD)
    assert due_rules(quiet) == []
    assert sleep_seconds(quiet, 0.0, TIMEOUT, 5.0) == 5.0


@pytest.mark.parametrize("rule", ["start_timeout", "cancel_timeout", "max_runtime", "heartbeat_timeout"])
def test_a_rule_is_due_exactly_at_its_deadline(rule: str) -> None:
    assert due_rules(Deadlines(heard_lag=HEARD, **{rule: 0.0})) == [rule]
    assert due_rules(Deadlines(heard_lag=HEARD, **{rule: -12.0})) == [rule]
    assert due_rules(Deadlines(heard_lag=HEARD, **{rule: 0.001})) == []


def test_due_rules_keep_the_sweep_order() -> None:
    every = Deadlines(start_timeout=-1, cancel_timeout=-1, max_runtime=-1, heartbeat_timeout=-1, heard_lag=HEARD)
    assert due_rules(every) == ["start_timeout", "cancel_timeout", "max_runtime", "heartbeat_timeout"]


def test_the_sleep_ends_just_past_the_earliest_deadline_less_the_time_since_it_was_read() -> None:
    d = Deadlines(start_timeout=4.0, max_runtime=2.0, heartbeat_timeout=3.0, heard_lag=HEARD)
    assert sleep_seconds(d, 0.5, TIMEOUT, 10.0) == pytest.approx(1.5 + PAST_DEADLINE)
    assert sleep_seconds(d, 0.0, TIMEOUT, 1.0) == 1.0  # capped by the ceiling


def test_an_overdue_rule_sleeps_the_shortest_sleep_not_zero() -> None:
    # Held by another replica's locks, say: the loop must not spin.
    assert sleep_seconds(Deadlines(cancel_timeout=-3.0, heard_lag=HEARD), 0.0, TIMEOUT, 5.0) == SHORTEST_SLEEP


@pytest.mark.parametrize("lag", [None, TIMEOUT + 0.1])
def test_a_deaf_pipeline_sets_no_heartbeat_wakeup_but_keeps_the_others(lag: float | None) -> None:
    d = Deadlines(heartbeat_timeout=0.2, start_timeout=3.0, heard_lag=lag)
    assert is_deaf(d, TIMEOUT)
    assert sleep_seconds(d, 0.0, TIMEOUT, 10.0) == pytest.approx(3.0 + PAST_DEADLINE)


def test_heard_within_the_timeout_is_not_deaf() -> None:
    assert not is_deaf(Deadlines(heard_lag=TIMEOUT), TIMEOUT)


def _pass(*, fresh: bool = True, age: float | None = 30.0) -> StartedPass:
    version = None if age is None else datetime(2026, 1, 1, tzinfo=UTC)
    return StartedPass(fresh, version, age, None, None, None, None)


def test_a_pass_is_kept_only_if_read_afresh_over_a_settled_set() -> None:
    assert keep_pass(_pass())
    assert not keep_pass(_pass(fresh=False))  # itself a reuse
    assert not keep_pass(_pass(age=SETTLED_SECONDS - 0.1))  # a run became STARTED moments before
    assert not keep_pass(_pass(age=None))  # no STARTED run: nothing worth keeping


@pytest.mark.parametrize(
    ("last", "since", "age", "reuse"),
    [
        (Deadlines(heartbeat_timeout=20.0, max_runtime=None), 1.0, 5.0, True),
        (Deadlines(heartbeat_timeout=20.0, max_runtime=None), 18.5, 5.0, False),  # the deadline is near
        (Deadlines(heartbeat_timeout=None, max_runtime=2.5), 1.0, 5.0, False),
        (Deadlines(), 1.0, PASS_MAX_AGE, False),  # old: read afresh whatever happened
        (Deadlines(), 1.0, 5.0, True),
    ],
)
def test_a_kept_pass_is_reused_while_young_and_far_from_its_deadlines(
    last: Deadlines, since: float, age: float, reuse: bool
) -> None:
    assert reuse_pass(last, since, age) is reuse
