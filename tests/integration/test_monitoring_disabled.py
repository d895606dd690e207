"""Issue 8 item 9: `run_monitoring.enabled: false` turns off the monitoring rules only (start,
cancel, max-runtime and heartbeat timeouts); retries and the reap rule go on."""

from __future__ import annotations

import uuid

from runherd.contract import RunStatus
from tests.harness import Env, eventually, group_members


async def test_monitoring_off_still_retries_and_reaps(env: Env) -> None:
    env.configure(run_monitoring={"enabled": False})
    await env.start()
    unbounded = await env.submit([{"key": "a", "command": ["sleep", "600"]}], tags={"runherd/max_runtime": 1})
    lingering = await env.submit([{"key": "a", "command": ["sleep", "600"]}])
    failing = await env.submit([{"key": "a", "command": ["sh", "-c", "exit 3"]}], tags={"runherd/max_retries": 1})

    # Retries go on: the failed run is retried (and its retry fails and is not, max_retries 1).
    async def retried() -> list[dict[str, object]]:
        return await env.store.fetch("SELECT run_id FROM runs WHERE parent_run_id = $1", uuid.UUID(failing))

    retry = str((await eventually(retried, timeout=30, what="the retry run"))[0]["run_id"])
    await env.wait_status(retry, "FAILURE", timeout=30)

    # The reap rule goes on: a finished run's worker still running is stopped.
    handle = await env.handle(lingering)
    await env.wait_status(lingering, "STARTED")
    async with env.store.tx() as tx:
        await tx.transition([lingering], RunStatus.FAILURE, "failed by the test", from_=[RunStatus.STARTED])
    await eventually(lambda: not group_members(handle["pid"]), timeout=30, what="the lingering worker reaped")

    async def terminated() -> bool:
        return any(e["type"] == "WORKER_TERMINATED" for e in await env.events(lingering))

    await eventually(terminated, what="WORKER_TERMINATED")
    # The monitoring rules are off: the 1 s max runtime was never enforced, seconds later.
    assert await env.status(unbounded) == "STARTED"
