"""Issue 2: the process launcher's handle survives a launcher restart; metrics are served."""

from __future__ import annotations

import os
import signal
import time

from prometheus_client import generate_latest

from runherd.launchers.base import HealthStatus, WorkerRun
from runherd.launchers.process import ProcessLauncher, start_time
from tests.harness import Env, eventually, pids_alive

HANG_ON_FIRST = ["sh", "-c", 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then sleep 600; fi']


async def test_reused_pid_is_never_mistaken_for_the_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    launcher = ProcessLauncher({"log_dir": str(tmp_path)})
    handle = await launcher.launch(WorkerRun(run_id="r", attempt=1, job="j", env={}, command=["sleep", "30"]))
    assert handle["start_time"] == start_time(handle["pid"])
    impostor = {**handle, "start_time": handle["start_time"] - 1}  # same pid, another process
    assert (await launcher.check_health(impostor)).status is HealthStatus.NOT_FOUND
    assert await launcher.terminate(impostor) is False
    assert pids_alive([handle["pid"]])
    assert (await launcher.check_health(handle)).status is HealthStatus.RUNNING
    assert await launcher.terminate(handle, grace_seconds=0) is True
    await launcher.close()


async def test_terminate_escalates_to_sigkill_after_the_grace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    launcher = ProcessLauncher({"log_dir": str(tmp_path), "terminate_grace_seconds": 0.5})
    handle = await launcher.launch(
        WorkerRun(run_id="r", attempt=1, job="j", env={}, command=["sh", "-c", "trap '' TERM; echo ready; sleep 30"])
    )
    await eventually(lambda: "ready" in open(handle["log_path"]).read(), what="the trap installed")
    began = time.monotonic()
    assert await launcher.terminate(handle) is True
    assert 0.4 < time.monotonic() - began < 5
    exit_ = await anext(launcher.watch())
    assert exit_.signal == signal.SIGKILL and exit_.exit_code == 137
    assert "ready" in await launcher.debug_info(handle)
    await launcher.close()


async def test_launcher_restart_adopts_live_workers_and_reports_their_exit(env: Env) -> None:
    env.configure(run_monitoring={"heartbeat_timeout_seconds": 60})  # only the adopted watch can see it
    first = await env.start({"launcher": 1})
    await env.start({"heartbeat": 1, "monitor": 1})
    run_id = await env.submit([{"key": "a", "command": HANG_ON_FIRST}])
    await env.wait_status(run_id, "STARTED")
    handle = await env.handle(run_id, attempt=1)
    await first.close()  # the launcher goes away; its worker keeps running
    env.running.remove(first)
    assert pids_alive([handle["pid"]])
    await env.start({"launcher": 1})  # a new launcher process: the worker is not its child
    os.kill(handle["pid"], signal.SIGKILL)
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS" and run["attempt"] == 2
    exited = [e for e in await env.events(run_id) if e["type"] == "WORKER_EXITED" and e["attempt"] == 1]
    assert exited and "exit code unknown" in exited[0]["data"]["detail"]


async def test_monitor_publishes_gauges(env: Env) -> None:
    env.configure(run_coordinator={"max_concurrent_runs": 0})
    running = await env.start()
    await env.submit([{"key": "a", "command": ["true"]}])
    await env.submit([{"key": "a", "command": ["true"]}])
    monitor = running.services["monitor"][0]

    async def two_queued() -> bool:
        await monitor.refresh_gauges()  # type: ignore[attr-defined]
        return b'runherd_runs{status="QUEUED"} 2.0' in generate_latest()

    await eventually(two_queued, what="the queued gauge")
    assert b'runherd_queue_depth{queue="runherd.launcher.commands"}' in generate_latest()
