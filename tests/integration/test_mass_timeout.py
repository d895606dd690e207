"""Issue 12 item 9: a mass start timeout. Many runs stuck in STARTING with one deadline all become
FAILURE, every worker is stopped (in batches, off the sweep's path), each stop is in the event log,
and what the workers left in groups of their own is killed from the attempt's group record (no scan
of /proc)."""

from __future__ import annotations

from pathlib import Path

from tests.harness import LATE, ROOT, Env, eventually, pids_alive

NEVER_STARTS = [str(ROOT / "tests" / "fixtures" / "never_starts.sh")]
RUNS = 12


async def test_mass_start_timeout_fails_every_run_and_stops_every_worker(env: Env) -> None:
    env.configure(run_monitoring={"start_timeout_seconds": 3}, run_launcher=env.process_launcher(NEVER_STARTS))
    await env.start()
    ids = [await env.submit([{"key": "a", "command": ["true"]}]) for _ in range(RUNS)]
    handles = {run_id: await env.handle(run_id) for run_id in ids}

    async def leftovers() -> list[int] | None:
        paths = [Path(h["log_path"]).with_name("attempt-1.leftover") for h in handles.values()]
        texts = [p.read_text().strip() if p.exists() else "" for p in paths]
        return [int(t) for t in texts] if all(texts) else None

    children = await eventually(leftovers, timeout=15, what="every worker's leftover child recorded")
    assert len(pids_alive(children)) == RUNS
    for run_id in ids:
        assert await env.status(run_id) == "STARTING"

    async def all_failed() -> bool:
        return all([await env.status(run_id) == "FAILURE" for run_id in ids])

    await eventually(all_failed, timeout=20, what="every run FAILURE")
    for run_id in ids:
        run = await env.run(run_id)
        assert run is not None and "start_timeout_seconds" in (run["reason"] or "")
    workers = [h["pid"] for h in handles.values()]
    await eventually(lambda: not pids_alive(workers), timeout=10, what="every worker gone")
    await eventually(lambda: not pids_alive(children), timeout=10, what="every leftover child killed")

    async def all_logged() -> bool:
        for run_id in ids:
            types = [e["type"] for e in await env.events(run_id)]
            if types.count("WORKER_TERMINATED") != 1 or "WORKER_TERMINATE_FAILED" in types:
                return False
        return True

    await eventually(all_logged, timeout=10, what="one WORKER_TERMINATED per run")


async def test_start_timeout_kills_at_once_without_the_grace(env: Env) -> None:
    """A worker that never started has nothing to save: a start timeout SIGKILLs it, even one that
    ignores SIGTERM, instead of waiting out the launcher's terminate grace (60 s here)."""
    env.configure(run_monitoring={"start_timeout_seconds": 2}, run_launcher=env.process_launcher(LATE, grace=60))
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}], env={"LATE_SECONDS": "600"})
    handle = await env.handle(run_id)
    await env.wait_status(run_id, "FAILURE", timeout=20)
    await eventually(lambda: not pids_alive([handle["pid"]]), timeout=10, what="the worker killed, no grace")
    types = [e["type"] for e in await env.events(run_id)]
    assert "WORKER_TERMINATE_FAILED" not in types
