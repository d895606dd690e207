"""Issue 3: any number of monitor replicas, as real processes: no action taken twice, and a replica
SIGKILLed mid-way loses nothing."""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter

import pytest

from tests.harness import STUBBORN, Env, eventually, pids_alive, status_log

pytestmark = pytest.mark.slow


async def test_three_monitors_100_runs_a_third_crashed_each_resumed_once(env: Env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    marks = tmp_path / "marks"
    marks.mkdir()
    go = tmp_path / "go"
    # 100 Python workers boot at once: on 2 busy cores the last can take longer than the suite's
    # 10 s start timeout, and a run failed as stuck starting has its worker killed before this test
    # kills it. The start timeout is not what this test is about.
    env.configure(
        run_monitoring={"heartbeat_timeout_seconds": 30, "poll_interval_seconds": 0.5, "start_timeout_seconds": 120}
    )
    for _ in range(3):
        env.spawn("monitor")
    await env.start({"launcher": 1, "heartbeat": 1})
    step = ["sh", "-c", f"touch {marks}/$RUNHERD_RUN_ID.$RUNHERD_ATTEMPT; while [ ! -e {go} ]; do sleep 0.2; done"]
    async with status_log(env.amqp_url) as statuses:
        run_ids = [await env.submit([{"key": "wait", "command": step}], job="fleet") for _ in range(100)]
        await eventually(lambda: len(os.listdir(marks)) >= 100, timeout=120, what="all 100 workers running")
        victims = run_ids[::3]
        for run_id in victims:
            pid = (await env.handle(run_id, attempt=1))["pid"]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                rows = await env.store.fetch("SELECT status, reason FROM runs WHERE run_id = $1", uuid.UUID(run_id))
                pytest.fail(f"the worker of {run_id} attempt 1 was gone before the kill: run {dict(rows[0])}")
        await eventually(
            lambda: len(os.listdir(marks)) >= 100 + len(victims), timeout=120, what="every killed run resumed"
        )
        go.touch()

        async def all_done() -> bool:
            rows = await env.store.fetch("SELECT status, count(*) AS n FROM runs GROUP BY status")
            return {r["status"]: r["n"] for r in rows} == {"SUCCESS": 100}

        await eventually(all_done, timeout=120, what="all 100 runs SUCCESS")
        attempts = await env.store.count_attempts(run_ids)
        assert all(attempts[r] == 2 for r in victims), "every crash resumed exactly once"
        assert all(attempts[r] == 1 for r in run_ids if r not in victims)
        # Four statuses per run, and a resumed run's STARTED -> STARTED (attempt 2) once more.
        await eventually(
            lambda: sum(len(statuses.of(r)) for r in run_ids) >= 400 + len(victims), what="every status message"
        )
        for run_id in run_ids:
            resumed = ["STARTED"] if run_id in victims else []
            assert statuses.of(run_id) == ["QUEUED", "STARTING", "STARTED", *resumed, "SUCCESS"], statuses.of(run_id)
        assert not [k for k, n in Counter(statuses.message_ids).items() if n > 1]


async def test_monitor_sigkilled_while_runs_time_out_the_others_finish(env: Env) -> None:
    env.configure(
        run_monitoring={"heartbeat_timeout_seconds": 3, "poll_interval_seconds": 0.3},
        run_launcher=env.process_launcher(STUBBORN, grace=2),
    )
    victim = env.spawn("monitor")
    env.spawn("monitor")
    await env.start({"launcher": 1, "heartbeat": 1})
    run_ids = [
        await env.submit([{"key": "a", "command": ["sleep", "600"]}], tags={"runherd/max_runtime": 2})
        for _ in range(12)
    ]

    async def started() -> bool:
        rows = await env.store.fetch("SELECT count(*) AS n FROM runs WHERE status = 'STARTED'")
        return rows[0]["n"] == 12

    await eventually(started, timeout=60, what="all runs started")
    pids = [(await env.handle(r))["pid"] for r in run_ids]

    async def first_failure() -> bool:
        rows = await env.store.fetch("SELECT count(*) AS n FROM runs WHERE status = 'FAILURE'")
        return rows[0]["n"] > 0

    await eventually(first_failure, timeout=30, interval=0.01, what="the first timeout")
    victim.kill()  # mid-way through its actions: terminating stubborn workers takes seconds

    async def all_failed() -> bool:
        rows = await env.store.fetch(
            "SELECT reason FROM runs WHERE run_id = ANY($1::uuid[])", [uuid.UUID(r) for r in run_ids]
        )
        return all(r["reason"] == "exceeded max runtime of 2 s" for r in rows)

    await eventually(all_failed, timeout=30, what="every run failed by the max runtime")
    await eventually(lambda: not pids_alive(pids), timeout=30, what="every worker terminated")
