"""Issue 5: run retries on real processes, RabbitMQ and PostgreSQL, with second-scale timeouts."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

from tests.harness import Env, eventually, status_log

FAIL_FIRST_TIME = 'if [ -e {flag} ]; then exit 0; fi; touch {flag}; echo "first time fails" >&2; exit 3'


def counted(path: str | os.PathLike[str], key: str) -> list[str]:
    """A step whose every execution appends one line to ``path``."""
    return ["sh", "-c", f"echo {key} >> {path}"]


def lines(path: os.PathLike[str]) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


async def children(env: Env, run_id: str) -> list[dict[str, Any]]:
    return await env.store.fetch("SELECT * FROM runs WHERE parent_run_id = $1 ORDER BY created_at", uuid.UUID(run_id))


async def retry_of(env: Env, run_id: str, timeout: float = 20) -> str:
    async def child() -> str | None:
        rows = await children(env, run_id)
        return str(rows[0]["run_id"]) if rows else None

    return await eventually(child, timeout, what=f"the retry of {run_id}")


async def decided(env: Env, run_id: str, timeout: float = 20) -> None:
    """Wait until the monitor has taken its retry decision on a failed run."""

    async def check() -> bool:
        rows = await env.store.fetch("SELECT retried FROM runs WHERE run_id = $1", uuid.UUID(run_id))
        return bool(rows and rows[0]["retried"])

    await eventually(check, timeout, what=f"the retry decision on {run_id}")


async def event_types(env: Env, run_id: str) -> list[str]:
    return [e["type"] for e in await env.events(run_id)]


def three_steps(tmp: os.PathLike[str]) -> list[dict[str, Any]]:
    effects, flag = f"{tmp}/effects", f"{tmp}/flag"
    return [
        {"key": "one", "command": counted(effects, "one")},
        {
            "key": "two",
            "command": ["sh", "-c", f"echo two >> {effects}; " + FAIL_FIRST_TIME.format(flag=flag)],
            "deps": ["one"],
        },
        {"key": "three", "command": counted(effects, "three"), "deps": ["two"]},
    ]


async def test_step_failure_retried_from_failure_reuses_the_steps_that_succeeded(env: Env) -> None:
    await env.start()
    async with status_log(env.amqp_url) as statuses:
        origin = await env.submit(three_steps(env.tmp), tags={"runherd/max_retries": 1, "team": "data"})
        failed = await env.wait_status(origin, "FAILURE")
        assert failed["failure_kind"] == "step"
        retry = await retry_of(env, origin)
        run = await env.wait_status(retry, "SUCCESS", "FAILURE")
        assert run["status"] == "SUCCESS"
        await eventually(lambda: "SUCCESS" in statuses.of(retry), what="the retry's SUCCESS message")
    # Step one succeeded in the origin: its output was reused, it never ran again.
    assert lines(env.tmp / "effects") == ["one", "two", "two", "three"]
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert steps["one"]["reused"] and steps["one"]["attempt"] == 0
    assert not steps["two"]["reused"] and not steps["three"]["reused"]
    assert str(run["parent_run_id"]) == origin and str(run["root_run_id"]) == origin and run["retry_number"] == 1
    assert run["tags"]["runherd/retry_number"] == 1 and run["tags"]["team"] == "data"
    # The retry number is in every status message of the retry.
    messages = [m for m in statuses.messages if m["run_id"] == retry]
    assert [m["status"] for m in messages] == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]
    assert all(m["tags"]["runherd/retry_number"] == 1 and m["parent_run_id"] == origin for m in messages)
    retried = [e for e in await env.events(origin) if e["type"] == "RUN_RETRIED"]
    assert len(retried) == 1 and retry in retried[0]["message"] and "retry 1 of 1" in retried[0]["message"]


async def test_all_steps_strategy_runs_every_step_again(env: Env) -> None:
    await env.start()
    origin = await env.submit(
        three_steps(env.tmp), tags={"dagster/max_retries": "1", "runherd/retry_strategy": "ALL_STEPS"}
    )
    await env.wait_status(origin, "FAILURE")
    retry = await retry_of(env, origin)
    run = await env.wait_status(retry, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS"
    assert lines(env.tmp / "effects") == ["one", "two", "one", "two", "three"]
    assert not any(s["reused"] for s in run["steps_status"])


async def test_retries_stop_at_max_retries_and_respect_the_backoff(env: Env) -> None:
    env.configure(run_retries={"max_retries": 2, "retry_backoff_seconds": 0.6, "retry_backoff_max_seconds": 0.9})
    await env.start()
    origin = await env.submit([{"key": "a", "command": ["sh", "-c", "exit 1"]}])
    chain = [origin]
    for _ in range(2):
        await env.wait_status(chain[-1], "FAILURE")
        chain.append(await retry_of(env, chain[-1]))
    last = await env.wait_status(chain[-1], "FAILURE")
    await decided(env, chain[-1])
    assert await children(env, chain[-1]) == []  # no third retry
    skipped = [e for e in await env.events(chain[-1]) if e["type"] == "RETRY_SKIPPED"]
    assert len(skipped) == 1 and "all 2 retries used" in skipped[0]["message"]
    assert last["retry_number"] == 2 and str(last["root_run_id"]) == origin
    runs = [await env.run(r) for r in chain]
    assert [r["retry_number"] for r in runs] == [0, 1, 2]  # type: ignore[index]
    # `runherd show` lists the lineage: the root, then each retry of its parent.
    from runherd.store import retries as retry_store
    from runherd.views import _lineage_lines, _show_json

    view = _show_json(last, await retry_store.lineage(env.store, origin))
    assert [r["run_id"] for r in view["lineage"]] == chain and view["children"] == []
    shown = _lineage_lines(view)
    assert shown[0].endswith("FAILURE   root") and shown[1].endswith(f"retry 1 of {chain[0]}")
    assert shown[2].endswith(f"retry 2 of {chain[1]}  <- this run")
    assert all(str(r["root_run_id"]) == origin for r in runs)  # type: ignore[index]
    # Backoff: 0.6 s, then 1.2 s capped at 0.9 s, counted from the failure; nothing starts earlier.
    for parent, child, delay in ((runs[0], runs[1], 0.6), (runs[1], runs[2], 0.9)):
        assert child is not None and parent is not None
        assert abs((child["not_before"] - parent["ended_at"]).total_seconds() - delay) < 0.01
        starting = [
            e
            for e in await env.events(str(child["run_id"]))
            if e["type"] == "RUN_STATUS" and e["data"].get("to") == "STARTING"
        ]
        waited = (starting[0]["ts"] - parent["ended_at"]).total_seconds()
        assert waited >= delay, (waited, delay)
        print(f"retry {child['retry_number']}: backoff {delay} s, dequeued {waited:.2f} s after the failure")


async def test_no_step_retries_skips_a_step_failure_but_retries_a_crash_limit_failure(env: Env) -> None:
    env.configure(
        run_retries={"max_retries": 1, "retry_on_step_failure": False}, run_monitoring={"max_resume_run_attempts": 0}
    )
    await env.start()
    step_failure = await env.submit([{"key": "a", "command": ["sh", "-c", "exit 1"]}])
    flag = env.tmp / "crash-flag"
    crash = await env.submit(
        [{"key": "a", "command": ["sh", "-c", f"if [ -e {flag} ]; then exit 0; fi; touch {flag}; sleep 600"]}]
    )
    assert (await env.wait_status(step_failure, "FAILURE"))["failure_kind"] == "step"
    await decided(env, step_failure)
    assert await children(env, step_failure) == []
    assert "RETRY_SKIPPED" in await event_types(env, step_failure)

    await eventually(flag.exists, what="the step to start")
    handle = await env.handle(crash, attempt=1)
    os.kill(handle["pid"], signal.SIGKILL)
    failed = await env.wait_status(crash, "FAILURE")
    assert failed["failure_kind"] == "infrastructure" and "resume is off" in failed["reason"]
    retry = await retry_of(env, crash)
    assert (await env.wait_status(retry, "SUCCESS", "FAILURE"))["status"] == "SUCCESS"


async def test_a_run_that_timed_out_starting_is_retried(env: Env) -> None:
    flag = env.tmp / "start-flag"
    # The first worker never reports (it sleeps); the next one is a real worker.
    worker = [
        "sh",
        "-c",
        f'if [ -e {flag} ]; then exec "{sys.executable}" -m runherd.cli worker; fi; touch {flag}; exec sleep 600',
    ]
    env.configure(
        run_monitoring={"start_timeout_seconds": 4},  # a worker boots in well under 4 s even on a loaded machine
        run_launcher={
            "name": "process",
            "config": {"log_dir": str(env.tmp / "logs"), "worker_command": worker, "terminate_grace_seconds": 1},
        },
    )
    await env.start()
    origin = await env.submit(
        [{"key": "a", "command": ["true"]}], tags={"runherd/max_retries": 1, "runherd/retry_on_step_failure": False}
    )
    failed = await env.wait_status(origin, "FAILURE")
    assert "did not start within 4 s" in failed["reason"] and failed["failure_kind"] == "infrastructure"
    retry = await retry_of(env, origin)
    run = await env.wait_status(retry, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS" and run["retry_number"] == 1


async def test_a_launch_failure_is_retried(env: Env) -> None:
    env.configure(
        run_retries={"max_retries": 1},
        run_launcher={
            "name": "process",
            "config": {"log_dir": str(env.tmp / "logs"), "worker_command": [str(env.tmp / "no-such-worker")]},
        },
    )
    await env.start()
    origin = await env.submit([{"key": "a", "command": ["true"]}])
    failed = await env.wait_status(origin, "FAILURE")
    assert failed["reason"].startswith("launch failed") and failed["failure_kind"] == "infrastructure"
    retry = await retry_of(env, origin)
    assert (await env.wait_status(retry, "FAILURE"))["reason"].startswith("launch failed")
    await decided(env, retry)
    assert await children(env, retry) == []


async def test_three_monitor_replicas_retry_each_failed_run_exactly_once(env: Env) -> None:
    env.configure(run_retries={"max_retries": 1}, run_monitoring={"poll_interval_seconds": 0.1})
    await env.start({"launcher": 1, "heartbeat": 1, "monitor": 3})
    async with status_log(env.amqp_url, "QUEUED.#") as queued:
        origins = [await env.submit([{"key": "a", "command": ["sh", "-c", "exit 1"]}]) for _ in range(8)]
        retries = [await retry_of(env, o) for o in origins]
        for r in retries:
            await env.wait_status(r, "FAILURE")
            await decided(env, r)
        await eventually(lambda: len(queued.messages) >= 16, what="16 QUEUED messages")
    rows = await env.store.fetch(
        "SELECT parent_run_id, count(*) AS n FROM runs WHERE parent_run_id IS NOT NULL GROUP BY parent_run_id"
    )
    assert sorted(str(r["parent_run_id"]) for r in rows) == sorted(origins)
    assert all(r["n"] == 1 for r in rows)  # one retry per failed run, none for the retries themselves
    assert (await env.store.fetch("SELECT count(*) AS n FROM runs"))[0]["n"] == 16
    assert sorted(m["run_id"] for m in queued.messages) == sorted(origins + retries)  # each published once
    retried_events = await env.store.fetch(
        "SELECT run_id, count(*) AS n FROM events WHERE type = 'RUN_RETRIED' GROUP BY run_id"
    )
    assert len(retried_events) == 8 and all(r["n"] == 1 for r in retried_events)


async def test_concurrent_claims_retry_each_failed_run_once(env: Env) -> None:
    """Six monitors' retry sweeps racing on one database, in small batches: one retry per run."""
    from runherd.config import RunRetries
    from runherd.contract import Launch, RunStatus, Step
    from runherd.launcher.commands import insert_launch
    from runherd.monitor.retries import retry_failed_runs
    from runherd.store import Store

    ids = []
    for i in range(60):
        launch = Launch(
            run_id=str(uuid.uuid4()),
            job="race",
            steps=(Step(key="a", command=["true"]),),
            tags={"runherd/retry_on_step_failure": i % 2 == 0},
        )
        await insert_launch(env.store, launch)
        ids.append(launch.run_id)
    assert len(await env.store.dequeue(-1, [])) == 60
    async with env.store.tx() as tx:
        await tx.transition(ids, RunStatus.FAILURE, "boom", failure_kind="step")
    config = RunRetries(max_retries=1)
    stores = [await Store.connect(env.db_url, max_size=2) for _ in range(6)]

    async def monitor(store: Store) -> int:
        queued = 0
        while (await store.fetch("SELECT count(*) AS n FROM runs WHERE status = 'FAILURE' AND NOT retried"))[0]["n"]:
            queued += await retry_failed_runs(store, config, batch=4)
        return queued

    try:
        counts = await asyncio.gather(*(monitor(s) for s in stores))
    finally:
        for s in stores:
            await s.close()
    assert sum(counts) == 30, counts  # the odd runs said no retry on a step failure
    rows = await env.store.fetch(
        "SELECT parent_run_id, count(*) AS n FROM runs WHERE parent_run_id IS NOT NULL GROUP BY parent_run_id"
    )
    assert sorted(str(r["parent_run_id"]) for r in rows) == sorted(ids[::2]) and {r["n"] for r in rows} == {1}
    pending = await env.store.fetch("SELECT count(*) AS n FROM runs WHERE status = 'FAILURE' AND NOT retried")
    assert pending[0]["n"] == 0
    print(f"retries queued per replica: {counts}")
