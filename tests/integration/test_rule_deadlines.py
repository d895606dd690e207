"""rule_deadlines against the rules it stands for: a sweep runs a monitoring rule only when its
deadline has passed, so for every rule the deadline must be due exactly when the rule's own query
finds a run (the heartbeat rule's cases are in test_heartbeat_outage.py)."""

from __future__ import annotations

import uuid

import pytest

from runherd.rules.sweeps import due_rules
from tests.harness import Env

START, CANCEL = 10.0, 5.0


async def _run(env: Env, status: str, *, ago: float, max_runtime: float | None = None) -> uuid.UUID:
    """A run in ``status`` since ``ago`` seconds (started as long ago), its attempt heard just now."""
    run_id = uuid.uuid4()
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, steps, root_run_id, started_at, status_changed_at, "
        "max_runtime_seconds) VALUES ($1, 'j', $2, 1, '[]', $1, now() - make_interval(secs => $3), "
        "now() - make_interval(secs => $3), $4)",
        run_id,
        status,
        ago,
        max_runtime,
    )
    await env.store.pool.execute(
        "INSERT INTO attempts (run_id, attempt, launched_at, last_heartbeat_at) VALUES ($1, 1, now(), now())",
        run_id,
    )
    return run_id


async def _found(env: Env, rule: str, limit: float) -> set[uuid.UUID]:
    async with env.store.tx() as tx:
        return {r["run_id"] for r in await tx.violators(rule, limit, 100)}


# (status, in it for, the run's max runtime tag, the config's max runtime, rule, due?)
CASES = [
    ("STARTING", 12.0, None, 0.0, "start_timeout", True),
    ("STARTING", 8.0, None, 0.0, "start_timeout", False),
    ("CANCELING", 6.0, None, 0.0, "cancel_timeout", True),
    ("CANCELING", 4.0, None, 0.0, "cancel_timeout", False),
    ("STARTED", 70.0, None, 60.0, "max_runtime", True),
    ("STARTED", 50.0, None, 60.0, "max_runtime", False),
    ("STARTED", 70.0, None, 0.0, "max_runtime", False),  # no limit configured
    ("STARTED", 25.0, 20.0, 0.0, "max_runtime", True),  # the tag's limit
    ("STARTED", 25.0, 30.0, 20.0, "max_runtime", False),  # the tag overrides a shorter config
    ("STARTED", 90.0, 0.0, 60.0, "max_runtime", False),  # a tag of 0: no limit for this run
]
QUERY = {"start_timeout": "stuck_starting", "cancel_timeout": "stuck_canceling", "max_runtime": "over_max_runtime"}


@pytest.mark.parametrize(("status", "ago", "tag", "config_max", "rule", "due"), CASES)
async def test_a_rule_is_due_exactly_when_its_query_finds_the_run(
    env: Env, status: str, ago: float, tag: float | None, config_max: float, rule: str, due: bool
) -> None:
    await env.store.pool.execute("UPDATE event_watermark SET applied_through = now()")
    await _run(env, "STARTED", ago=1.0)  # a healthy neighbour
    run_id = await _run(env, status, ago=ago, max_runtime=tag)
    deadlines = await env.store.rule_deadlines(30.0, 180.0, START, CANCEL, config_max)
    assert (rule in due_rules(deadlines)) is due, deadlines
    limit = {"start_timeout": START, "cancel_timeout": CANCEL, "max_runtime": config_max}[rule]
    assert (run_id in await _found(env, QUERY[rule], limit)) is due


async def test_a_failed_run_awaiting_its_retry_decision_is_pending(env: Env) -> None:
    assert (await env.store.rule_deadlines(30.0, 180.0, START, CANCEL, 0.0)).retries_pending is False
    run_id = uuid.uuid4()
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, steps, root_run_id, ended_at) "
        "VALUES ($1, 'j', 'FAILURE', 1, '[]', $1, now())",
        run_id,
    )
    assert (await env.store.rule_deadlines(30.0, 180.0, START, CANCEL, 0.0)).retries_pending is True
    await env.store.pool.execute("UPDATE runs SET retried = true WHERE run_id = $1", run_id)
    assert (await env.store.rule_deadlines(30.0, 180.0, START, CANCEL, 0.0)).retries_pending is False
