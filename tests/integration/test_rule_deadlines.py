"""rule_deadlines against the rules it stands for: a sweep runs a monitoring rule only when its
deadline has passed, so for every rule the deadline must be due exactly when the rule's own query
finds a run (the heartbeat rule's cases are in test_heartbeat_outage.py)."""

from __future__ import annotations

import uuid

import pytest

from runherd.rules.sweeps import Deadlines, StartedPass, due_rules, keep_pass, reuse_pass
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


# --- the pass over the STARTED runs, reused while no run joins them -------------------------------


async def _deadlines(env: Env, cached: StartedPass | None = None, config_max: float = 0.0) -> Deadlines:
    return await env.store.rule_deadlines(30.0, 180.0, START, CANCEL, config_max, cached)


async def test_a_settled_pass_is_kept_and_reused_until_a_run_becomes_started(env: Env) -> None:
    await env.store.pool.execute("UPDATE event_watermark SET applied_through = now()")
    await env.store.pool.execute(
        "INSERT INTO heartbeat_replicas (replica, heard_through, seen_at) VALUES ('r', now(), now())"
    )
    await _run(env, "STARTED", ago=60.0, max_runtime=3600.0)
    first = await _deadlines(env)
    assert first.started is not None and first.started.read_afresh and keep_pass(first.started)
    again = await _deadlines(env, first.started)
    assert again.started is not None and not again.started.read_afresh  # the pass was skipped
    assert again.max_runtime == pytest.approx(first.max_runtime, abs=1.0)
    # A run that becomes STARTED moves the version: the same statement reads afresh and sees it.
    await _run(env, "STARTED", ago=0.0, max_runtime=5.0)
    joined = await _deadlines(env, first.started)
    assert joined.started is not None and joined.started.read_afresh
    assert joined.max_runtime is not None and joined.max_runtime < 6.0
    assert not keep_pass(joined.started)  # the set has not settled: the next sweep reads again


async def test_a_pass_read_while_runs_are_starting_is_not_kept(env: Env) -> None:
    await _run(env, "STARTED", ago=2.0)
    fresh = await _deadlines(env)
    assert fresh.started is not None and fresh.started.read_afresh and not keep_pass(fresh.started)


async def test_a_reused_pass_is_a_lower_bound_and_a_near_deadline_reads_afresh(env: Env) -> None:
    await env.store.pool.execute("UPDATE event_watermark SET applied_through = now()")
    await env.store.pool.execute(
        "INSERT INTO heartbeat_replicas (replica, heard_through, seen_at) VALUES ('r', now(), now())"
    )
    run_id = await _run(env, "STARTED", ago=60.0)
    await env.store.pool.execute(
        "UPDATE attempts SET last_heartbeat_at = now() - interval '20 seconds' WHERE run_id = $1", run_id
    )
    first = await _deadlines(env)
    assert first.heartbeat_timeout is not None and 8.0 < first.heartbeat_timeout < 10.5
    # The worker heartbeats again: its deadline moves 20 s later, the reused pass still says the old one.
    await env.store.pool.execute("UPDATE attempts SET last_heartbeat_at = now() WHERE run_id = $1", run_id)
    assert first.started is not None
    reused = await _deadlines(env, first.started)
    assert reused.heartbeat_timeout is not None and reused.heartbeat_timeout < 10.5  # earlier, never later
    assert reuse_pass(reused, 0.0, 1.0)
    assert not reuse_pass(reused, reused.heartbeat_timeout - 1.0, 1.0)  # near it: read afresh
    assert not reuse_pass(reused, 0.0, 1_000.0)  # too old
    exact = await _deadlines(env)
    assert exact.heartbeat_timeout is not None and exact.heartbeat_timeout > 25.0
