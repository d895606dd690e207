"""Issue 3: the failure modes of Dagster, Airflow and Prefect that must never happen here."""

from __future__ import annotations

import os
import signal

from runherd.contract import Event, EventType, now_iso
from tests.fixtures.launchers import BlockingLauncher
from tests.harness import LATE, SILENT, STUBBORN, Env, eventually, pids_alive, status_log


async def test_late_run_success_after_timeout_is_refused(env: Env) -> None:
    """Dagster #34175: a terminal status never changes again."""
    await env.start()
    async with status_log(env.amqp_url) as statuses:
        timed_out = await env.submit([{"key": "a", "command": ["sleep", "600"]}], tags={"runherd/max_runtime": 1})
        await env.wait_status(timed_out, "FAILURE")
        late = Event(run_id=timed_out, attempt=1, seq=10_000, type=EventType.RUN_SUCCESS, ts=now_iso())
        await env.broker.publish_event(timed_out, late.body(), token=await env.token(timed_out, 1))

        async def refused() -> list[dict[str, object]]:
            return [e for e in await env.events(timed_out) if e["seq"] == 10_000 and e["refused"]]

        [row] = await eventually(refused, what="the late RUN_SUCCESS refused")
        assert "already FAILURE" in str(row["refused"])
        assert await env.status(timed_out) == "FAILURE"
        assert "SUCCESS" not in statuses.of(timed_out)


async def test_user_cancel_is_never_mistaken_for_a_crash(env: Env) -> None:
    """Dagster #21476: the worker dies while the run is CANCELING: CANCELED, never resumed."""
    env.configure(run_launcher=env.process_launcher(STUBBORN, grace=60))
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["sleep", "600"]}])
    await env.wait_status(run_id, "STARTED")
    handle = await env.handle(run_id)
    await env.cancel(run_id)
    await env.wait_status(run_id, "CANCELING")
    os.kill(handle["pid"], signal.SIGKILL)  # it dies while canceling, as a crash would
    run = await env.wait_status(run_id, "CANCELED", "STARTED", "FAILURE")
    assert run["status"] == "CANCELED" and run["attempt"] == 1
    assert not [e for e in await env.events(run_id) if e["type"] == "RUN_RESUMED"]
    assert (await env.store.count_attempts([run_id]))[run_id] == 1


async def test_worker_that_never_heartbeats_is_still_detected(env: Env) -> None:
    """Airflow's bug: a NULL last heartbeat compared as 'not stale'."""
    env.configure(
        run_monitoring={"max_resume_run_attempts": 0, "heartbeat_timeout_seconds": 2, "start_timeout_seconds": 2},
        run_launcher=env.process_launcher(SILENT),
    )
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(run_id, "STARTED")
    handle = await env.handle(run_id)
    run = await env.wait_status(run_id, "FAILURE")
    assert "never sent one" in run["reason"] and "no heartbeat" in run["reason"]
    await eventually(lambda: not pids_alive([handle["pid"]]), what="the silent worker terminated")


async def test_worker_coming_up_after_start_timeout_is_refused_and_terminated(env: Env) -> None:
    """Dagster #29101: a worker that starts after its run was failed by the start timeout. A start
    timeout SIGKILLs at once, so the late worker comes up only because the kill hangs (as a Docker or
    Kubernetes API can) until the worker is up and refused."""
    env.configure(run_monitoring={"start_timeout_seconds": 1}, run_launcher=env.process_launcher(LATE, grace=30))
    blocking = BlockingLauncher(dict(env.cfg.run_launcher.config))
    await env.start(launcher=blocking)
    run_id = await env.submit([{"key": "a", "command": ["sleep", "600"]}], env={"LATE_SECONDS": "3"})
    handle = await env.handle(run_id)
    run = await env.wait_status(run_id, "FAILURE")
    assert "did not start within 1 s" in run["reason"]

    async def refused() -> list[dict[str, object]]:
        return [e for e in await env.events(run_id) if e["refused"]]

    rows = await eventually(refused, what="the late worker's events refused")
    assert "already FAILURE" in str(rows[0]["refused"])
    blocking.release.set()
    await eventually(lambda: not pids_alive([handle["pid"]]), timeout=20, what="the late worker terminated")
    assert await env.status(run_id) == "FAILURE"


async def test_timed_out_run_frees_its_slot_at_once(env: Env) -> None:
    """Prefect #16746: the slot is free the moment the run fails, not when its worker is gone."""
    env.configure(run_coordinator={"max_concurrent_runs": 1}, run_launcher=env.process_launcher(STUBBORN, grace=60))
    await env.start()
    first = await env.submit([{"key": "a", "command": ["sleep", "600"]}], tags={"runherd/max_runtime": 1})
    await env.wait_status(first, "STARTED")
    second = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(first, "FAILURE")
    first_worker = await env.handle(first)
    await env.wait_status(second, "STARTING", "STARTED", "SUCCESS")
    assert pids_alive([first_worker["pid"]])  # the slot did not wait for the stubborn worker


async def test_unknown_health_is_not_a_crash(env: Env) -> None:
    """Dagster #19554: a backend API error is not a crash; only an exit or the heartbeat deadline is."""
    from tests.fixtures.launchers import UnknownHealthLauncher

    launcher = UnknownHealthLauncher({"log_dir": str(env.tmp / "logs")})
    await env.start(launcher=launcher)
    run_id = await env.submit([{"key": "a", "command": ["sleep", "5"]}])
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS" and run["attempt"] == 1
    assert not [e for e in await env.events(run_id) if e["type"] == "RUN_RESUMED"]
