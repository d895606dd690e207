"""Issue 11, item 2: step retry policies on real processes, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import os
import signal

from tests.harness import Env, eventually


def lines(path: os.PathLike[str] | str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def flaky(effects: str, fail_tries: int) -> list[str]:
    """Appends its try number (one line per execution), fails its first ``fail_tries`` tries."""
    return ["sh", "-c", f'echo "$RUNHERD_STEP_TRY" >> {effects}; [ "$RUNHERD_STEP_TRY" -gt {fail_tries} ]']


async def test_a_step_that_fails_twice_then_succeeds_takes_3_tries_and_the_run_succeeds(env: Env) -> None:
    await env.start()
    effects = env.tmp / "effects"
    # Try 1 times out (the timeout is per try), try 2 exits 1, try 3 succeeds.
    command = (
        f'echo "$RUNHERD_STEP_TRY" >> {effects}; '
        'if [ "$RUNHERD_STEP_TRY" = 1 ]; then exec sleep 30; fi; [ "$RUNHERD_STEP_TRY" -gt 2 ]'
    )
    retry = {"max_retries": 3, "delay_seconds": 0.1, "backoff": "exponential"}
    run_id = await env.submit(
        [
            {"key": "flaky", "command": ["sh", "-c", command], "timeout_seconds": 1.5, "retry": retry},
            {"key": "after", "command": ["sh", "-c", f"echo after >> {effects}"], "deps": ["flaky"]},
        ]
    )
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS", run["reason"]
    assert lines(effects) == ["1", "2", "3", "after"]
    events = [e for e in await env.events(run_id) if e["step_key"] == "flaky"]
    kinds = [e["type"] for e in events]
    assert kinds == [
        "STEP_START",
        "STEP_UP_FOR_RETRY",
        "STEP_RESTARTED",
        "STEP_UP_FOR_RETRY",
        "STEP_RESTARTED",
        "STEP_SUCCESS",
    ], kinds
    up = [e for e in events if e["type"] == "STEP_UP_FOR_RETRY"]
    assert [e["data"]["try"] for e in up] == [1, 2]
    assert "timed out after 1.5 s" in up[0]["data"]["reason"] and "exited with code 1" in up[1]["data"]["reason"]
    # exponential: retry n waits 0.1 * (2**n - 1)
    assert [round(e["data"]["delay_seconds"], 3) for e in up] == [0.1, 0.3]
    assert [e["data"]["try"] for e in events if e["type"] == "STEP_RESTARTED"] == [2, 3]
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert steps["flaky"]["status"] == "SUCCESS"


async def test_exhausted_retries_fail_the_run_with_the_tries_counted(env: Env) -> None:
    await env.start()
    effects = env.tmp / "effects"
    # The run's default from the tag: one retry.
    run_id = await env.submit(
        [{"key": "bad", "command": flaky(str(effects), 9)}], tags={"runherd/step_retry": "1", "runherd/max_retries": 0}
    )
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert run["status"] == "FAILURE" and "after 2 tries" in run["reason"]
    assert lines(effects) == ["1", "2"]


async def test_a_worker_killed_during_a_retry_delay_resumes_at_that_retry(env: Env) -> None:
    await env.start()
    effects = env.tmp / "effects"
    run_id = await env.submit(
        [{"key": "flaky", "command": flaky(str(effects), 1), "retry": {"max_retries": 3, "delay_seconds": 2}}]
    )

    async def waiting() -> bool:
        return any(e["type"] == "STEP_UP_FOR_RETRY" for e in await env.events(run_id))

    await eventually(waiting, what="the step's first try to fail")
    handle = await env.handle(run_id, attempt=1)
    os.kill(handle["pid"], signal.SIGKILL)  # during the 2 s delay before try 2
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS" and run["attempt"] == 2, run["reason"]
    assert lines(effects) == ["1", "2"]  # try 1 once, then try 2 in the resumed attempt: not from zero
    events = await env.events(run_id)
    restarted = [e for e in events if e["type"] == "STEP_RESTARTED"]
    assert [(e["attempt"], e["data"]["try"]) for e in restarted] == [(2, 2)]
    assert not [e for e in events if e["type"] == "STEP_START" and e["attempt"] == 2]
