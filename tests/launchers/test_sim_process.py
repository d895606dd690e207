"""The sim launcher with its fleet in a process of its own (``fleet_process: true``), beyond the
contract (tests/launchers/test_contract.py runs it as ``sim_process``): when that process dies every
worker it hosted is reported exited (and the log of one that exited before stays readable), closing
the launcher stops it, and it ends with the launcher's process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import orjson

from runherd.launchers.base import Handle, HealthStatus, WorkerExit, WorkerRun
from runherd.launchers.process import start_time
from runherd.launchers.sim import SimLauncher
from tests import harness


def _run(outcome: str) -> WorkerRun:
    env = {"RUNHERD_SIM_OUTCOME": outcome}
    return WorkerRun(run_id=str(uuid.uuid4()), attempt=1, job="fleet-process", env=env)


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {within:g} s waiting for {what}"
        await asyncio.sleep(0.05)


async def _started(launcher: SimLauncher, handles: list[Handle]) -> bool:
    texts = [await launcher.debug_info(h) for h in handles]
    return all("started" in text for text in texts)


async def test_a_killed_fleet_process_reports_every_live_worker_exited(env: harness.Env) -> None:
    launcher = SimLauncher({"amqp_url": env.amqp_url, "step_seconds": 0.05, "fleet_process": True})
    seen: list[WorkerExit] = []

    async def consume() -> None:
        async for worker_exit in launcher.watch():
            seen.append(worker_exit)

    watching = asyncio.create_task(consume())
    try:
        done = _run("succeed")
        done_handle = await launcher.launch(done)
        await _until(lambda: _async(any(e.run_id == done.run_id for e in seen)), 10, "the first worker's exit")
        runs = [_run("wait") for _ in range(6)]
        handles = [await launcher.launch(r) for r in runs]
        pid = handles[0]["fleet_pid"]
        assert pid != os.getpid() and {h["fleet_pid"] for h in handles} == {pid}
        await _until(lambda: _started(launcher, handles), 15, "every worker to report RUN_START")

        os.kill(pid, signal.SIGKILL)
        wanted = {r.run_id for r in runs}
        await _until(lambda: _async(wanted <= {e.run_id for e in seen}), 10, "every live worker's exit")
        gone = [e for e in seen if e.run_id in wanted]
        assert len(gone) == len(runs), gone  # each once
        assert all(e.exit_code is None and e.reason == "exited" and "SIGKILL" in (e.message or "") for e in gone)
        assert [e.run_id for e in seen].count(done.run_id) == 1  # an exit already reported is not reported again
        # An exited worker's log came with its exit: readable with its fleet process gone.
        assert "started" in await launcher.debug_info(done_handle)
        for handle in handles:
            assert (await launcher.check_health(handle)).status is HealthStatus.NOT_FOUND
            assert await launcher.terminate(handle, grace_seconds=0) is False

        # The next launch starts a new fleet process; closing the launcher stops it.
        again = await launcher.launch(_run("wait"))
        assert (again["fleet"], again["fleet_pid"]) != (handles[0]["fleet"], pid)
        await _until(lambda: _started(launcher, [again]), 15, "the worker of the new fleet process")
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await launcher.close()
    assert start_time(again["fleet_pid"]) is None, "the fleet process outlived its launcher"


async def _async(value: bool) -> bool:
    return value


LAUNCHER = """
import asyncio, sys, orjson
from runherd.launchers.base import WorkerRun
from runherd.launchers.sim import SimLauncher

async def main():
    launcher = SimLauncher({"amqp_url": sys.argv[1], "fleet_process": True})
    run = WorkerRun(run_id="r-1", attempt=1, job="orphan", env={"RUNHERD_SIM_OUTCOME": "wait"})
    print(orjson.dumps(await launcher.launch(run)).decode(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_the_fleet_process_ends_with_the_launchers_process(env: harness.Env) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, env.amqp_url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        handle = orjson.loads(await asyncio.wait_for(parent.stdout.readline(), 30))
        child = handle["fleet_pid"]
        assert child != parent.pid and start_time(child) == handle["fleet_started"]
    finally:
        parent.kill()
        await parent.wait()
    await _until(lambda: _async(start_time(child) is None), 10, "the orphaned fleet process to exit")
