"""Issue 8 items 4, 6 and 9 on the whole system (process launcher, real PostgreSQL and RabbitMQ).

- a worker crash after two steps of 600 KB each: the resumed attempt starts with 1.2 MB of
  completed outputs in its plan (the environment variable used to make it "Argument list too long");
- a step output over the 1 MiB limit fails its step, saying so;
- each worker's events carry its identity, so two workers of one attempt are never confused;
- the worker's log is capped; the launch loop claims only what it can launch now.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from runherd.launcher import commands
from runherd.launcher import launching as launching_module
from runherd.launcher.launching import HandleMap, Launching, claims_to_take, lease_seconds
from runherd.launchers.base import Handle, WorkerRun
from runherd.launchers.process import ProcessLauncher
from runherd.plan import MAX_OUTPUT_BYTES
from tests.harness import Env, eventually
from tests.launchers.test_process_one_worker import MARK, workers_of, workers_settled

CRASH_ON_FIRST = ["sh", "-c", 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then kill -9 $PPID; sleep 30; fi']


async def test_a_resume_with_1_2_mb_of_completed_outputs_starts_and_succeeds(env: Env) -> None:
    await env.start()
    run_id = await env.submit(
        [
            {"key": "a", "call": "tests.fixtures.big_steps:chunk"},
            {"key": "b", "call": "tests.fixtures.big_steps:chunk"},
            {"key": "c", "command": CRASH_ON_FIRST, "deps": ["a", "b"]},
        ]
    )
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=60)
    events = await env.events(run_id)
    assert run["status"] == "SUCCESS" and run["attempt"] == 2, [(e["type"], e["message"]) for e in events]
    starts = [e for e in events if e["type"] == "RUN_START" and e["attempt"] == 2]
    assert starts and starts[0]["data"]["reused"] == ["a", "b"]
    outputs = [e["data"]["output"] for e in events if e["type"] == "STEP_SUCCESS" and e["step_key"] in "ab"]
    assert sum(len(o) for o in outputs) == 1_200_000
    assert not [e for e in events if e["type"] == "STEP_START" and e["attempt"] == 2 and e["step_key"] != "c"]


async def test_an_output_over_the_limit_fails_its_step_with_the_reason(env: Env) -> None:
    await env.start()
    run_id = await env.submit([{"key": "big", "call": "tests.fixtures.big_steps:too_big"}])
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "FAILURE"
    failed = [e for e in await env.events(run_id) if e["type"] == "STEP_FAILURE"]
    assert failed and f"over the limit of {MAX_OUTPUT_BYTES} bytes" in failed[0]["message"]


async def test_each_worker_has_an_identity_in_its_events(env: Env) -> None:
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(run_id, "SUCCESS", timeout=30)
    handle = await env.handle(run_id, attempt=1)
    sources = {e["source"] for e in await env.events(run_id) if e["seq"] is not None and e["seq"] > 0}
    assert handle["worker_id"] and sources == {f"worker:{handle['worker_id']}"}


async def test_two_workers_of_one_attempt_are_not_each_others_redeliveries(env: Env) -> None:
    run_id = str(uuid.uuid4())
    body = {"v": 1, "run_id": run_id, "job": "j", "steps": [{"key": "a", "command": ["true"]}]}
    await commands.apply(env.store, "launch", body)

    async def insert(source: str) -> bool:
        async with env.store.tx() as tx:
            return await tx.insert_event(
                run_id=run_id,
                attempt=1,
                source=source,
                seq=1,
                type_="RUN_START",
                step_key=None,
                message=None,
                data={},
                refused=None,
                ts=datetime.now(UTC),
            )

    assert await insert("worker:first") is True
    assert await insert("worker:second") is True  # same seq, another worker: not a redelivery
    assert await insert("worker:first") is False  # a real redelivery is still dropped


async def test_the_worker_log_is_capped(env: Env) -> None:
    cap = 64 * 1024
    env.configure(run_launcher={"config": {"max_log_bytes": cap}})
    await env.start()
    noisy = [sys.executable, "-c", "import sys\nfor _ in range(256): sys.stderr.write('x' * 4095 + '\\n')"]
    run_id = await env.submit([{"key": "noisy", "command": noisy}])
    await env.wait_status(run_id, "SUCCESS", timeout=30)
    log = Path((await env.handle(run_id, attempt=1))["log_path"])
    sizes = await asyncio.to_thread(lambda: (log.stat().st_size, log.with_name(log.name + ".1").stat().st_size))
    # 1 MiB written; on disk at most the cap in the rotated file and the cap plus a check's
    # worth of writing in the live one.
    assert sizes[0] <= cap + cap // 8 and 0 < sizes[1] <= cap, sizes


class HeldLauncher(ProcessLauncher):
    """Launches wait until the test releases them: a slow backend in a launch storm."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.release = asyncio.Event()
        self.started = 0

    async def launch(self, run: WorkerRun) -> Handle:
        self.started += 1
        await self.release.wait()
        return {"launcher": "held", "run_id": run.run_id, "attempt": run.attempt}  # no process


def test_a_claim_lease_stays_well_inside_the_start_timeout() -> None:
    """A launcher killed with claims in hand: another takes them over before the start timeout."""
    assert [lease_seconds(t) for t in (180, 30, 10, 3)] == [60, 10, 5, 5]
    assert all(lease_seconds(t) <= t / 2 for t in (10, 30, 180, 600))


def test_claims_to_take() -> None:
    assert [claims_to_take(16, n) for n in (0, 10, 16, 20)] == [16, 6, 0, 0]
    assert claims_to_take(100, 0, cap=64) == 64


async def test_the_launch_loop_claims_only_free_slots(env: Env) -> None:
    for _ in range(5):
        body = {"v": 1, "run_id": str(uuid.uuid4()), "job": "j", "steps": [{"key": "a", "command": ["true"]}]}
        await commands.apply(env.store, "launch", body)
    launcher = HeldLauncher({"log_dir": str(env.tmp / "logs")})
    launching = Launching(env.cfg, env.store, launcher, HandleMap(), concurrency=2)

    async def claimed() -> int:
        rows = await env.store.fetch("SELECT count(*) AS n FROM attempts WHERE launch_claimed_at IS NOT NULL")
        return int(rows[0]["n"])

    assert await launching.tick() == 2
    assert await launching.tick() == 0  # both slots busy: nothing claimed ahead of its launch
    assert await claimed() == 2 and launching.in_flight == 2
    launcher.release.set()
    await launching.drain()
    assert await launching.tick() == 2
    await launching.drain()
    assert await launching.tick() == 1
    await launching.drain()
    assert await claimed() == 5 and launcher.started == 5
    await launcher.close()


def test_the_handle_map_is_bounded() -> None:
    handles = HandleMap(maxsize=3)
    for n in range(5):
        handles[("run", n)] = {"n": n}
    assert list(handles) == [("run", 2), ("run", 3), ("run", 4)]


async def test_a_failed_handle_record_never_makes_a_second_worker(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database blip between starting the worker and recording its handle: once the claim's
    lease runs out the attempt is launched again, and the launch adopts the first worker."""
    monkeypatch.setattr(launching_module, "LAUNCH_LEASE_SECONDS", 1)
    run_id = str(uuid.uuid4())
    body = {"v": 1, "run_id": run_id, "job": "j", "steps": [{"key": "a", "command": ["true"]}], "env": {MARK: run_id}}
    await commands.apply(env.store, "launch", body)
    launcher = ProcessLauncher({"log_dir": str(env.tmp / "logs"), "worker_command": ["sleep", "60"]})
    record_launches = env.store.record_launches
    blips = []

    async def blip_once(*args: Any) -> Any:
        if not blips:
            blips.append(args)
            raise ConnectionResetError("the database went away")
        return await record_launches(*args)

    monkeypatch.setattr(env.store, "record_launches", blip_once)
    launching = Launching(env.cfg, env.store, launcher, HandleMap())
    try:
        assert await launching.tick() == 1
        await launching.drain()
        assert blips
        [first_pid] = await workers_settled(run_id, 1)

        async def relaunched() -> bool:
            await launching.tick()
            await launching.drain()
            rows = await env.store.fetch("SELECT handle FROM attempts WHERE handle IS NOT NULL")
            return bool(rows)

        await eventually(relaunched, timeout=15, what="the attempt launched again after its lease")
        handle = await env.handle(run_id, attempt=1)
        assert handle["pid"] == first_pid and workers_of(run_id) == [first_pid]
    finally:
        for pid in workers_of(run_id):
            os.kill(pid, signal.SIGKILL)
        await launcher.close()
