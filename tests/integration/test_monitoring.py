"""Issue 3: run monitoring on real processes, RabbitMQ and PostgreSQL, with second-scale timeouts."""

from __future__ import annotations

import os
import signal

from tests.harness import STUBBORN, Env, eventually, group_members, pids_alive

# A step that blocks forever on the first attempt only: a resumed attempt gets through.
HANG_ON_FIRST = ["sh", "-c", 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then sleep 600; fi']


def count_step(path: str, key: str) -> list[str]:
    """A step whose side effect (one line appended per execution) we can count."""
    return ["sh", "-c", f"echo {key} >> {path}"]


def lines(path: os.PathLike[str] | str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


async def test_sigkill_worker_during_step_2_resumes_without_rerunning_step_1(env: Env) -> None:
    await env.start()
    effects = env.tmp / "effects"
    started = env.tmp / "step2-started"
    run_id = await env.submit(
        [
            {"key": "one", "command": count_step(str(effects), "one")},
            {
                "key": "two",
                "command": [
                    "sh",
                    "-c",
                    f'echo two >> {effects}; if [ "$RUNHERD_ATTEMPT" = 1 ]; then touch {started}; sleep 600; fi',
                ],
                "deps": ["one"],
            },
            {"key": "three", "command": count_step(str(effects), "three"), "deps": ["two"]},
        ]
    )
    await eventually(started.exists, what="step two to start")
    handle = await env.handle(run_id, attempt=1)
    os.kill(handle["pid"], signal.SIGKILL)
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS" and run["attempt"] == 2
    assert lines(effects).count("one") == 1, lines(effects)  # step one ran exactly once
    assert lines(effects).count("two") == 2 and lines(effects).count("three") == 1
    events = await env.events(run_id)
    exited = [e for e in events if e["type"] == "WORKER_EXITED" and e["attempt"] == 1]
    assert exited and "SIGKILL" in exited[0]["message"]
    resumed = [e for e in events if e["type"] == "RUN_RESUMED"]
    assert len(resumed) == 1 and "resume attempt 1 of 3" in resumed[0]["message"]
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert steps["one"]["attempt"] == 1 and steps["two"]["attempt"] == 2
    # The killed attempt's step (sh) and its child (sleep) are gone: nothing of attempt 1 runs on.
    assert not _processes_of(run_id, 1)


def _processes_of(run_id: str, attempt: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if f"RUNHERD_RUN_ID={run_id}".encode() in environ and f"RUNHERD_ATTEMPT={attempt}".encode() in environ:
            found.append(int(entry))
    return found


async def test_sigkill_every_attempt_fails_after_max_resumes(env: Env) -> None:
    env.configure(run_monitoring={"max_resume_run_attempts": 2})
    await env.start()
    run_id = await env.submit([{"key": "hang", "command": ["sleep", "600"]}])
    for attempt in (1, 2, 3):
        handle = await env.handle(run_id, attempt=attempt)
        await eventually(lambda: _step_running(env, run_id, attempt), what=f"attempt {attempt} running")
        os.kill(handle["pid"], signal.SIGKILL)
    run = await env.wait_status(run_id, "FAILURE")
    assert "crashed 3 times" in run["reason"] and run["attempt"] == 3
    events = await env.events(run_id)
    resumes = [e["message"] for e in events if e["type"] == "RUN_RESUMED"]
    assert len(resumes) == 2
    assert "resume attempt 1 of 2" in resumes[0] and "resume attempt 2 of 2" in resumes[1]
    assert (await env.store.count_attempts([run_id]))[run_id] == 3


async def _step_running(env: Env, run_id: str, attempt: int) -> bool:
    events = await env.events(run_id)
    return any(e["type"] == "STEP_START" and e["attempt"] == attempt for e in events)


async def test_resume_off_makes_a_crash_a_failure(env: Env) -> None:
    env.configure(run_monitoring={"max_resume_run_attempts": 0})
    await env.start()
    run_id = await env.submit([{"key": "hang", "command": ["sleep", "600"]}])
    handle = await env.handle(run_id)
    await eventually(lambda: _step_running(env, run_id, 1), what="step running")
    os.kill(handle["pid"], signal.SIGKILL)
    run = await env.wait_status(run_id, "FAILURE")
    assert "resume is off" in run["reason"] and run["attempt"] == 1
    assert (await env.store.count_attempts([run_id]))[run_id] == 1


async def test_stuck_starting_worker_that_never_reports_fails_and_is_gone(env: Env) -> None:
    env.configure(
        run_monitoring={"start_timeout_seconds": 2},
        run_launcher={
            "name": "process",
            "config": {
                "log_dir": str(env.tmp / "logs"),
                "worker_command": ["sleep", "600"],
                "terminate_grace_seconds": 1,
            },
        },
    )
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    handle = await env.handle(run_id)
    run = await env.wait_status(run_id, "FAILURE")
    assert "did not start within 2 s" in run["reason"]
    await eventually(lambda: not pids_alive([handle["pid"]]), what="worker process gone")

    async def terminated() -> bool:
        return any(e["type"] == "WORKER_TERMINATED" for e in await env.events(run_id))

    await eventually(terminated, what="the termination in the event log")


async def test_stuck_canceling_worker_ignoring_sigterm_is_killed_and_canceled(env: Env) -> None:
    env.configure(run_monitoring={"cancel_timeout_seconds": 2}, run_launcher=env.process_launcher(STUBBORN, grace=60))
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["sleep", "600"]}])
    await env.wait_status(run_id, "STARTED")
    handle = await env.handle(run_id)
    await env.cancel(run_id)
    await env.wait_status(run_id, "CANCELING")
    assert pids_alive([handle["pid"]])  # it ignored SIGTERM
    run = await env.wait_status(run_id, "CANCELED")
    assert "force-killed" in run["reason"]
    # The kill is carried out after the decision commits (no launcher call under a row lock), and
    # the event log says so only once the worker is really gone.

    async def terminated() -> bool:
        return any(e["type"] == "WORKER_TERMINATED" for e in await env.events(run_id))

    await eventually(terminated, what="WORKER_TERMINATED logged")
    assert not group_members(handle["pid"])


async def test_max_runtime_tag_fails_run_and_stops_worker(env: Env) -> None:
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["sleep", "600"]}], tags={"runherd/max_runtime": 2})
    handle = await env.handle(run_id)
    run = await env.wait_status(run_id, "FAILURE")
    assert run["reason"] == "exceeded max runtime of 2 s"
    await eventually(lambda: not group_members(handle["pid"]), what="worker gone")


async def test_global_max_runtime_and_dagster_tag(env: Env) -> None:
    env.configure(run_monitoring={"max_runtime_seconds": 2})
    await env.start()
    plain = await env.submit([{"key": "a", "command": ["sleep", "600"]}])
    tagged = await env.submit([{"key": "a", "command": ["sleep", "600"]}], tags={"dagster/max_runtime": 1})
    assert (await env.wait_status(plain, "FAILURE"))["reason"] == "exceeded max runtime of 2 s"
    assert (await env.wait_status(tagged, "FAILURE"))["reason"] == "exceeded max runtime of 1 s"
    handle = await env.handle(plain)
    await eventually(lambda: not group_members(handle["pid"]), what="worker gone")


async def test_sigstop_hung_worker_detected_terminated_resumed(env: Env) -> None:
    await env.start()
    run_id = await env.submit([{"key": "a", "command": HANG_ON_FIRST}])
    await eventually(lambda: _step_running(env, run_id, 1), what="step running")
    old = await env.handle(run_id, attempt=1)
    os.kill(old["pid"], signal.SIGSTOP)
    run = await env.wait_status(run_id, "SUCCESS", timeout=30)
    assert run["attempt"] == 2
    events = await env.events(run_id)
    resumed = [e for e in events if e["type"] == "RUN_RESUMED"]
    assert resumed and "no heartbeat" in resumed[0]["message"] and "hung" in resumed[0]["message"]
    await eventually(lambda: not pids_alive([old["pid"]]), what="hung worker terminated")


async def test_zombie_worker_events_refused_and_terminated(env: Env) -> None:
    env.configure(
        run_launcher={"name": "process", "config": {"log_dir": str(env.tmp / "logs"), "terminate_grace_seconds": 60}}
    )
    await env.start()
    run_id = await env.submit([{"key": "a", "command": HANG_ON_FIRST}])
    await eventually(lambda: _step_running(env, run_id, 1), what="step running")
    old = await env.handle(run_id, attempt=1)
    os.kill(old["pid"], signal.SIGSTOP)
    await env.handle(run_id, attempt=2, timeout=30)  # resumed while the old worker is frozen
    os.kill(old["pid"], signal.SIGCONT)  # the zombie wakes up, still believing it owns the run

    async def refused() -> list[dict[str, object]]:
        return [e for e in await env.events(run_id) if e["attempt"] == 1 and e["refused"]]

    rows = await eventually(refused, what="the zombie's events refused")
    assert "attempt 1 is not the current attempt (2)" in str(rows[0]["refused"])
    await eventually(lambda: not pids_alive([old["pid"]]), what="the zombie terminated")
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", "CANCELED")
    assert run["status"] == "SUCCESS" and run["attempt"] == 2
    assert all(s["attempt"] == 2 for s in run["steps_status"])


async def test_step_timeout_kills_the_step(env: Env) -> None:
    await env.start()
    run_id = await env.submit([{"key": "slow", "command": ["sleep", "600"], "timeout_seconds": 1}])
    run = await env.wait_status(run_id, "FAILURE")
    failure = [e for e in await env.events(run_id) if e["type"] == "STEP_FAILURE"]
    assert failure[0]["message"] == "timed out after 1 s"
    assert "slow" in run["reason"]


async def test_monitoring_disabled_turns_the_sweeps_off(env: Env) -> None:
    env.configure(run_monitoring={"enabled": False})
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["sleep", "3"]}], tags={"runherd/max_runtime": 1})
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS"  # no sweep enforced the 1 s max runtime


async def test_max_concurrent_runs_is_never_exceeded(env: Env) -> None:
    env.configure(run_coordinator={"max_concurrent_runs": 2, "dequeue_interval_seconds": 0.2})
    await env.start()
    run_ids = [await env.submit([{"key": "a", "command": ["sleep", "0.5"]}]) for _ in range(10)]
    peak = 0

    async def done() -> bool:
        nonlocal peak
        rows = await env.store.fetch("SELECT status, count(*) AS n FROM runs GROUP BY status")
        counts = {r["status"]: r["n"] for r in rows}
        peak = max(peak, counts.get("STARTING", 0) + counts.get("STARTED", 0) + counts.get("CANCELING", 0))
        return counts.get("SUCCESS") == 10

    await eventually(done, timeout=60, interval=0.02, what="all ten runs SUCCESS")
    assert peak == 2, peak  # sampled: never more than 2, and the limit was actually reached
    assert len(run_ids) == 10


async def test_a_timeout_fires_on_time_not_a_poll_interval_late(env: Env) -> None:
    """The sweep sleeps until the earliest deadline: with a 60 s poll, a 1 s start timeout still
    fails the run within seconds."""
    env.configure(
        run_monitoring={"poll_interval_seconds": 60, "start_timeout_seconds": 1},
        run_launcher={
            "name": "process",
            "config": {"log_dir": str(env.tmp / "logs"), "worker_command": ["sleep", "600"]},
        },
    )
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(run_id, "STARTING")
    run = await env.wait_status(run_id, "FAILURE", timeout=8)
    assert "did not start within 1 s" in run["reason"]
