"""Issue 8 item 7: no launcher call under a run row lock. The monitor's run launcher hangs in
terminate and check_health (as a Docker or Kubernetes API can); while it hangs, the run's rows are
free and event ingest for the same run goes on."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from runherd.contract import Event, EventType, now_iso
from tests.fixtures.launchers import BlockingLauncher
from tests.harness import SILENT, STUBBORN, Env, eventually, group_members, pids_alive


async def _rows_are_free(env: Env, run_id: str) -> bool:
    """Lock the run's rows with NOWAIT from another connection: fails at once if anyone holds them."""
    conn = await asyncpg.connect(env.db_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '100ms'")
            await conn.fetch("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE NOWAIT", uuid.UUID(run_id))
            await conn.fetch("SELECT 1 FROM attempts WHERE run_id = $1 FOR UPDATE NOWAIT", uuid.UUID(run_id))
            raise _Rollback
    except _Rollback:
        return True
    except asyncpg.LockNotAvailableError:
        return False
    finally:
        await conn.close()


class _Rollback(Exception):
    pass


async def _free_while_hanging(env: Env, run_id: str) -> None:
    """Other services lock the rows for a moment (a launch, an event batch), so a few tries; a lock
    held across the hanging launcher call would never be released."""
    await eventually(lambda: _rows_are_free(env, run_id), timeout=5, interval=0.2, what="the run's rows free")


async def _ingest_goes_on(env: Env, run_id: str, attempt: int) -> None:
    """A worker event for the same run is applied (in the event log) within seconds."""
    event = Event(run_id=run_id, attempt=attempt, seq=9999, type=EventType.STEP_START, step_key="probe", ts=now_iso())
    await env.broker.publish_event(run_id, event.body(), token=await env.token(run_id, attempt))

    async def applied() -> bool:
        return any(e["seq"] == 9999 for e in await env.events(run_id))

    await eventually(applied, timeout=10, what="the probe event applied while the launcher hangs")


async def _start(env: Env, command: list[str]) -> BlockingLauncher:
    await env.start({"launcher": 1, "heartbeat": 1})
    blocking = BlockingLauncher(dict(env.process_launcher(command, grace=60)["config"]))
    await env.start({"monitor": 1}, launcher=blocking)
    return blocking


async def test_cancel_timeout_kills_after_commit(env: Env) -> None:
    env.configure(run_monitoring={"cancel_timeout_seconds": 2}, run_launcher=env.process_launcher(STUBBORN, grace=60))
    blocking = await _start(env, STUBBORN)
    run_id = await env.submit([{"key": "a", "command": ["sleep", "600"]}])
    await env.wait_status(run_id, "STARTED")
    handle = await env.handle(run_id)
    await env.cancel(run_id)
    await asyncio.wait_for(blocking.entered.wait(), 30)  # the monitor's terminate is in flight
    assert await env.status(run_id) == "CANCELED"  # decided and committed before acting
    await _free_while_hanging(env, run_id)
    await _ingest_goes_on(env, run_id, 1)
    assert pids_alive([handle["pid"]])  # nothing was said or done about the worker yet
    assert not [e for e in await env.events(run_id) if e["type"] == "WORKER_TERMINATED"]

    blocking.release.set()
    await eventually(lambda: not group_members(handle["pid"]), what="the worker killed")

    async def terminated() -> list[str]:
        # The probe event was refused (the run is CANCELED), so fencing may have raced the kill.
        messages = [str(e["message"]) for e in await env.events(run_id) if e["type"] == "WORKER_TERMINATED"]
        return [m for m in messages if "terminated worker of attempt 1" in m]

    await eventually(terminated, what="WORKER_TERMINATED")


async def test_heartbeat_timeout_resumes_without_asking_the_backend_under_lock(env: Env) -> None:
    env.configure(
        run_monitoring={"heartbeat_timeout_seconds": 2, "start_timeout_seconds": 8},
        run_launcher=env.process_launcher(SILENT, grace=1),
    )
    blocking = await _start(env, SILENT)
    run_id = await env.submit([{"key": "a", "command": ["sleep", "600"]}])
    first = await env.handle(run_id, attempt=1)
    await asyncio.wait_for(blocking.entered.wait(), 30)  # killing the silent attempt 1
    run = await env.run(run_id)
    assert run is not None and run["attempt"] >= 2  # the resume committed before the kill
    await _free_while_hanging(env, run_id)
    await _ingest_goes_on(env, run_id, run["attempt"])
    blocking.release.set()
    await eventually(lambda: not pids_alive([first["pid"]]), what="attempt 1's worker killed")
