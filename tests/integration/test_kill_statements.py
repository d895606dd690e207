"""The kill statements of queries_kills.sql, directly: claim_kills marks and claims in the deciding
transaction (the reap rule leaves the claim alone for its lease), log_kill_failure writes once."""

from __future__ import annotations

import uuid

from runherd.store import RunRef
from runherd.store import kills as kill_store
from tests.harness import Env


async def _run_with_attempts(env: Env, live: int, exited: int) -> str:
    # Handles without a pid: the harness SIGKILLs the process group of every stored pid at teardown.
    run_id = uuid.uuid4()
    await env.store.fetch(
        "INSERT INTO runs (run_id, job, status, attempt, steps) VALUES ($1, 'j', 'STARTED', $2, '[]')", run_id, live
    )
    await env.store.fetch(
        """INSERT INTO attempts (run_id, attempt, handle, exited_at)
           VALUES ($1, $2, '{"worker": 1}', now()), ($1, $3, '{"worker": 2}', NULL), ($1, $3 + 1, NULL, NULL)""",
        run_id,
        exited,
        live,
    )
    return str(run_id)


async def test_claim_marks_and_claims_only_live_workers(env: Env) -> None:
    run_id = await _run_with_attempts(env, live=2, exited=1)
    async with env.store.tx() as tx:
        refs = await kill_store.claim(tx, [(run_id, 1), (run_id, 2), (run_id, 3)])
    # Attempt 1 has exited, attempt 3 has no worker yet: only attempt 2 is to be killed.
    assert refs == [RunRef(run_id, 2, {"worker": 2})]
    rows = await env.store.fetch(
        "SELECT attempt, reap_after = '-infinity' AS due, reap_claimed_at IS NOT NULL AS claimed FROM attempts "
        "WHERE run_id = $1 ORDER BY attempt",
        uuid.UUID(run_id),
    )
    assert [(r["attempt"], r["due"], r["claimed"]) for r in rows] == [
        (1, None, False),
        (2, True, True),
        (3, None, False),
    ]
    # The reap rule sees it due at once, but leaves it to the claimer for the lease.
    assert await env.store.claim_reaps(0, 60, 10) == []
    assert await env.store.claim_reaps(0, 0, 10) == [RunRef(run_id, 2, {"worker": 2})]


async def test_a_failed_kill_is_logged_once_per_attempt(env: Env) -> None:
    run_id = await _run_with_attempts(env, live=2, exited=1)
    for _ in range(3):
        await kill_store.record_failure(env.store, RunRef(run_id, 2), "could not", source="monitor", data={"a": 1})
    await kill_store.record_failure(env.store, RunRef(run_id, 1), "could not", source="monitor", data={})
    rows = await env.store.fetch(
        "SELECT attempt, data FROM events WHERE run_id = $1 AND type = 'WORKER_TERMINATE_FAILED' ORDER BY attempt",
        uuid.UUID(run_id),
    )
    assert [(r["attempt"], r["data"]) for r in rows] == [(1, {}), (2, {"a": 1})]
