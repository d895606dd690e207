"""Issue 2: schema migration, heartbeat batching, the status outbox; on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

from runherd.broker import HEARTBEATS_QUEUE
from runherd.contract import RunStatus, heartbeat_body, parse_launch
from runherd.outbox import relay
from runherd.store import Store, migrate
from runherd.store.migrate import migrations
from tests import harness
from tests.harness import Env, eventually, status_log


async def test_migrate_is_safe_concurrently_and_twice() -> None:
    name = f"runherd_mig_{uuid.uuid4().hex[:8]}"
    url = f"{harness.PG}/{name}"
    try:
        results = await asyncio.gather(*(migrate(url) for _ in range(5)))
        everything = len(migrations())
        assert sorted(len(r) for r in results) == [0, 0, 0, 0, everything]  # exactly one applied them
        assert await migrate(url) == []
        store = await Store.connect(url)
        await store.close()
    finally:
        await harness.drop_database(name)


async def test_service_on_unmigrated_database_says_so_and_exits_nonzero() -> None:
    name = f"runherd_empty_{uuid.uuid4().hex[:8]}"
    conn = await __import__("asyncpg").connect(f"{harness.PG}/postgres")
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            [harness.PYTHON, "-m", "runherd.cli", "monitor"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RUNHERD_DATABASE_URL": f"{harness.PG}/{name}"},
            cwd=harness.ROOT,
        )
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "not migrated" in lines[0] and "runherd migrate" in lines[0]
    finally:
        await harness.drop_database(name)


async def _started_run(env: Env) -> str:
    launch = parse_launch({"v": 1, "job": "hb", "steps": [{"key": "a", "command": ["true"]}]})
    await env.store.insert_run(launch, max_runtime_seconds=None, priority=0)
    await env.store.dequeue(-1, [])
    async with env.store.tx() as tx:
        await tx.transition([launch.run_id], RunStatus.STARTED)
    return launch.run_id


async def test_heartbeats_batched_written_once_and_stale_attempts_ignored(env: Env) -> None:
    run_id = await _started_run(env)
    await env.start({"heartbeat": 2})
    for _ in range(50):
        await env.broker.publish_heartbeat(heartbeat_body(run_id, 1), token=await env.token(run_id, 1))
    # an attempt that is not current
    await env.broker.publish_heartbeat(heartbeat_body(run_id, 7), token=await env.token(run_id, 7))

    async def seen() -> datetime | None:
        rows = await env.store.fetch("SELECT last_heartbeat_at FROM attempts WHERE run_id = $1", uuid.UUID(run_id))
        return rows[0]["last_heartbeat_at"]

    first = await eventually(seen, what="the heartbeat written")
    assert datetime.now(UTC) - first < timedelta(seconds=10)
    await eventually(lambda: _depth(env, HEARTBEATS_QUEUE), what="every heartbeat acked")
    rows = await env.store.fetch("SELECT attempt FROM attempts WHERE run_id = $1", uuid.UUID(run_id))
    assert [r["attempt"] for r in rows] == [1]  # attempt 7 created nothing


async def _depth(env: Env, queue: str) -> bool:
    return (await env.broker.queue_depths()).get(queue) == 0


async def test_heartbeats_are_not_acked_before_the_commit(env: Env) -> None:
    """With the database unreachable the heartbeat service keeps the messages (requeues)."""
    run_id = await _started_run(env)
    from runherd.heartbeat.service import HeartbeatService

    dead = await Store.connect(env.db_url)
    await dead.pool.close()  # every query on it now fails like a lost connection
    service = HeartbeatService(dead, env.broker)
    await env.broker.publish_heartbeat(heartbeat_body(run_id, 1))
    stop = asyncio.Event()
    got = []
    async for batch in env.broker.batches(HEARTBEATS_QUEUE, max_size=10, max_wait=0.05, stop=stop):
        got.extend(batch)
        try:
            await service.write(batch)
        except Exception:
            stop.set()
    assert got
    await eventually(lambda: _depth_is(env, HEARTBEATS_QUEUE, 1), what="the heartbeat back in its queue")


async def _depth_is(env: Env, queue: str, n: int) -> bool:
    return (await env.broker.queue_depths()).get(queue) == n


async def test_outbox_publishes_after_a_crash_between_commit_and_publish(env: Env) -> None:
    """Transitions committed while no relay runs (as if the process died right after the commit)
    are published, in order per run, when a relay comes up; each status once."""
    async with status_log(env.amqp_url) as statuses:
        run_id = await _started_run(env)
        async with env.store.tx() as tx:
            await tx.transition([run_id], RunStatus.SUCCESS)
        assert statuses.of(run_id) == []
        outbox = await env.store.fetch("SELECT count(*) AS n FROM status_outbox")
        assert outbox[0]["n"] == 4
        stop = asyncio.Event()
        task = asyncio.ensure_future(relay(env.store, env.broker, stop))
        await eventually(lambda: len(statuses.of(run_id)) == 4, what="the four statuses")
        stop.set()
        await task
        assert statuses.of(run_id) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]
        assert len(set(statuses.message_ids)) == len(statuses.message_ids)
    assert (await env.store.fetch("SELECT count(*) AS n FROM status_outbox"))[0]["n"] == 0


async def test_only_one_outbox_relay_is_active(env: Env) -> None:
    stop = asyncio.Event()
    relays = [asyncio.ensure_future(relay(env.store, env.broker, stop)) for _ in range(3)]
    async with status_log(env.amqp_url) as statuses:
        run_ids = [await _started_run(env) for _ in range(20)]
        await eventually(lambda: sum(len(statuses.of(r)) for r in run_ids) == 60, what="sixty statuses")
        for run_id in run_ids:
            assert statuses.of(run_id) == ["QUEUED", "STARTING", "STARTED"]
    stop.set()
    await asyncio.gather(*relays)


async def test_status_message_body_and_routing_key(env: Env) -> None:
    """The one place the status message of DESIGN.md is built: SQL functions used by every outbox write."""
    from datetime import UTC, datetime

    run_id = uuid.uuid4()
    [row] = await env.store.fetch(
        "SELECT runherd_status_key('FAILURE', 'nightly.etl') AS key, runherd_status_body($1, 'nightly.etl', "
        "'FAILURE', 'STARTED', 2, 'exceeded max runtime of 5 s', $2, '{\"team\": \"data\"}'::jsonb, NULL) AS body",
        run_id,
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    )
    assert row["key"] == "FAILURE.nightly_etl"
    assert row["body"] == {
        "v": 1,
        "run_id": str(run_id),
        "job": "nightly.etl",
        "status": "FAILURE",
        "previous_status": "STARTED",
        "attempt": 2,
        "reason": "exceeded max runtime of 5 s",
        "ts": "2026-01-02T03:04:05.000006Z",
        "tags": {"team": "data"},
        "parent_run_id": None,
    }


async def test_launches_recorded_in_one_statement_say_what_became_of_each_run(env: Env) -> None:
    started = await _started_run(env)
    canceled = await _started_run(env)
    async with env.store.tx() as tx:
        await tx.transition([canceled], RunStatus.CANCELING)
    missing = str(uuid.uuid4())
    got = await env.store.record_launches(
        [
            (started, 1, {"pid": 1}, "process"),
            (missing, 1, {"pid": 2}, "process"),
            (canceled, 1, {"pid": 3}, "process"),
            (started, 2, {"pid": 4}, "process"),  # no such attempt
        ]
    )
    assert got == [(RunStatus.STARTED, 1), None, (RunStatus.CANCELING, 1), None]
    rows = await env.store.fetch("SELECT run_id, handle, launcher, launched_at FROM attempts ORDER BY handle->>'pid'")
    assert [(str(r["run_id"]), r["handle"], r["launcher"]) for r in rows] == [
        (started, {"pid": 1}, "process"),
        (canceled, {"pid": 3}, "process"),
    ]
    assert all(r["launched_at"] is not None for r in rows)
