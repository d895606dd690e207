"""`runherd prune --older-than DURATION` against real PostgreSQL: a dry run deletes nothing; `--yes`
deletes only old finished runs with their events, steps and attempts, in batches, never a live run or
a recent one."""

from __future__ import annotations

import uuid

from tests.acceptance.test_cli import runherd
from tests.harness import Env, eventually

TABLES = ("runs", "events", "steps", "attempts")


async def _rows(env: Env, run_id: str) -> dict[str, int]:
    found = {}
    for table in TABLES:
        rows = await env.store.fetch(f"SELECT count(*) AS n FROM {table} WHERE run_id = $1", uuid.UUID(run_id))
        found[table] = rows[0]["n"]
    return found


async def _age(env: Env, run_id: str, days: int) -> None:
    """Pretend the run finished (or changed status) ``days`` ago; the fixture's only write."""
    await env.store.fetch(
        "UPDATE runs SET ended_at = ended_at - make_interval(days => $2),"
        " status_changed_at = status_changed_at - make_interval(days => $2),"
        " created_at = created_at - make_interval(days => $2) WHERE run_id = $1",
        uuid.UUID(run_id),
        days,
    )


async def test_prune_dry_run_then_yes_deletes_only_old_finished_runs(env: Env) -> None:
    await env.start()
    two_steps = [{"key": "a", "command": ["true"]}, {"key": "b", "command": ["true"], "deps": ["a"]}]
    old = [await env.submit(two_steps, job="old") for _ in range(4)]
    old_failed = await env.submit([{"key": "a", "command": ["false"]}], job="old")
    recent = await env.submit(two_steps, job="recent")
    live = await env.submit([{"key": "a", "command": ["sleep", "600"]}], job="live")
    for run_id in [*old, recent]:
        await env.wait_status(run_id, "SUCCESS")
    await env.wait_status(old_failed, "FAILURE")
    await env.wait_status(live, "STARTED")

    async def all_exited() -> bool:
        for run_id in [*old, old_failed, recent]:
            if not any(e["type"] == "WORKER_EXITED" for e in await env.events(run_id)):
                return False
        return True

    await eventually(all_exited, timeout=30, what="every finished worker's exit report")
    # Stop the services (the live worker keeps running): prune works on the database alone, and the
    # reaper must not re-record the exit that the fixture below erases.
    while env.running:
        await env.running.pop().close(grace=2)
    for run_id in [*old, old_failed, live]:
        await _age(env, run_id, days=10)
    # An old finished run whose worker's exit was never recorded: the reaper may still need its
    # handle, so prune keeps it.
    unreaped = old.pop()
    await env.store.fetch("UPDATE attempts SET exited_at = NULL WHERE run_id = $1", uuid.UUID(unreaped))
    doomed = [*old, old_failed]
    before = {run_id: await _rows(env, run_id) for run_id in [*doomed, recent, live]}
    assert all(before[r]["events"] > 0 and before[r]["steps"] > 0 and before[r]["attempts"] > 0 for r in doomed)

    dry = await runherd(env, "prune", "--older-than", "7d")
    assert dry.returncode == 0, dry.stderr
    expected_events = sum(before[r]["events"] for r in doomed)
    assert "would delete 4 finished run(s) older than 604800 s" in dry.stdout, dry.stdout
    assert f"{expected_events} events" in dry.stdout and "Nothing deleted" in dry.stdout, dry.stdout
    assert {r: await _rows(env, r) for r in before} == before

    done = await runherd(env, "prune", "--older-than", "7d", "--yes", "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    # 4 runs in batches of at most 3: two transactions.
    assert "batch 1: deleted 3 run(s)" in done.stdout and "batch 2: deleted 1 run(s)" in done.stdout, done.stdout
    assert f"deleted 4 finished run(s) older than 604800 s, {expected_events} events, 2 batch(es)" in done.stdout
    for run_id in doomed:
        assert await _rows(env, run_id) == dict.fromkeys(TABLES, 0)
    assert await _rows(env, recent) == before[recent]
    assert (await _rows(env, unreaped))["runs"] == 1
    # The live run keeps every row (it may have gained events meanwhile).
    after_live = await _rows(env, live)
    assert all(after_live[table] >= before[live][table] > 0 for table in TABLES), after_live
    assert await env.status(live) == "STARTED"

    again = await runherd(env, "prune", "--older-than", "7d", "--yes")
    assert "deleted 0 finished run(s)" in again.stdout
