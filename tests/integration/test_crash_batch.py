"""Issue 12 item 3: a crash storm's exits in one ingest batch are applied together (their events,
exits and resumes are three statements, not three per exit) with the same outcome as one by one:
each crash resumed once, a redelivered exit changes nothing, a run out of resumes fails."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from runherd import auth
from runherd.auth import TOKEN_HEADER
from runherd.broker import Delivery
from runherd.contract import Event, EventType, now_iso
from tests.harness import Env


async def _started(env: Env, resumes: int) -> str:
    run_id = str(uuid.uuid4())
    plan = orjson.dumps([{"key": "a", "command": ["true"], "deps": []}]).decode()
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, resumes, priority, tags, steps, root_run_id) "
        "VALUES ($1, 'crash-batch', 'STARTED', 1, $2, 0, '{}'::jsonb, $3::jsonb, $1)",
        uuid.UUID(run_id),
        resumes,
        plan,
    )
    await env.store.pool.execute(
        "INSERT INTO attempts (run_id, attempt, launcher, handle, launched_at) VALUES ($1, 1, 'process', $2, now())",
        uuid.UUID(run_id),
        {"launcher": "process", "pid": 0, "host": "elsewhere", "run_id": run_id, "attempt": 1},
    )
    return run_id


async def _exit(env: Env, run_id: str) -> Delivery:
    event = Event(
        run_id=run_id,
        attempt=1,
        seq=0,
        source="launcher",
        type=EventType.WORKER_EXITED,
        message="killed by signal 9 (SIGKILL)",
        data={"exit_code": 137, "signal": 9, "reason": "SIGKILL", "detail": "", "exited_at": now_iso()},
        ts=now_iso(),
    )
    token = await env.token(run_id, 1, auth.LAUNCHER)
    return Delivery(event.body(), f"run.{run_id}", {TOKEN_HEADER: token}, None)  # type: ignore[arg-type]


async def test_a_batch_of_crashed_workers_is_resumed_once_each_and_a_spent_one_fails(env: Env) -> None:
    running = await env.start({"monitor": 1})
    monitor: Any = running.services["monitor"][0]
    max_resumes = env.cfg.run_monitoring.max_resume_run_attempts
    a, b, spent = await _started(env, 0), await _started(env, 0), await _started(env, max_resumes)
    batch = [await _exit(env, a), await _exit(env, b), await _exit(env, a), await _exit(env, spent)]
    await monitor.apply_batch(batch)
    for run_id in (a, b):
        run = await env.run(run_id)
        assert run is not None and run["status"] == "STARTED" and run["attempt"] == 2
        types = [e["type"] for e in await env.events(run_id)]
        assert types.count("WORKER_EXITED") == 1 and types.count("RUN_RESUMED") == 1
    run = await env.run(spent)
    assert run is not None and run["status"] == "FAILURE" and "no resumes left" in run["reason"]
    rows = await env.store.fetch("SELECT exit_code FROM attempts WHERE attempt = 1 AND exited_at IS NOT NULL")
    assert sorted(r["exit_code"] for r in rows) == [137, 137, 137]
    await monitor.apply_batch([await _exit(env, b)])  # redelivered alone: nothing changes
    run = await env.run(b)
    assert run is not None and run["attempt"] == 2
