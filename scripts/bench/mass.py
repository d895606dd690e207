"""Mass action at a deadline: N runs stuck in STARTING with the same start deadline.

The monitor (one replica, in-process: runherd.app.start with the process launcher that started the
workers, as ``runherd up`` runs them) must move every run to FAILURE and stop every worker. Each
worker is a real process of the process launcher (``worker_command: [sleep, 600]``: it never
reports RUN_START, so its run stays STARTING), in its own process group, reaped by the launcher.
All runs' ``status_changed_at`` is one database timestamp T0, so all fall due at T0 +
start_timeout_seconds.

Measured from the deadline (database clock, same machine) to each run's FAILURE
(runs.status_changed_at), to each worker's exit (a pidfd per worker watched by a thread of this
process, local clock) and to its WORKER_TERMINATED line in the event log.
Two phases in one run:

* termination on: the monitor as it ships (batched terminations off the sweep's path);
* termination off: the same database work with the monitor's terminations switched off (its
  Actions queue nothing) and no processes, the database-only ceiling.

    .venv/bin/python scripts/bench/mass.py [--quick] [-n 1000]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402

from runherd import app, config  # noqa: E402
from runherd.launchers import WorkerRun  # noqa: E402
from runherd.launchers.process import ProcessLauncher  # noqa: E402
from runherd.monitor.actions import Actions  # noqa: E402
from runherd.store import RunRef, Store  # noqa: E402
from scripts.bench._benchlib import (  # noqa: E402
    BenchEnv,
    bench_env,
    machine,
    ms,
    pct,
    quiet_logs,
    rss,
    table,
    wait_for,
)

START_TIMEOUT = 4.0


class NoTerminations(Actions):
    """The database-only ceiling: decisions and claims as usual, no worker stopped."""

    def terminate_soon(self, refs: list[RunRef], why: str, *, grace: float | None = None) -> None:
        return None


def make_config(env: BenchEnv) -> config.Config:
    return config.from_mapping(
        {
            "amqp_url": env.amqp_url,
            "database_url": env.db_url,
            "run_monitoring": {
                "start_timeout_seconds": START_TIMEOUT,
                "poll_interval_seconds": 60,
                "heartbeat_timeout_seconds": 600,
            },
            "run_retries": {"enabled": False},
            "run_launcher": {
                "name": "process",
                "config": {"log_dir": str(env.tmp / "logs"), "worker_command": ["sleep", "600"]},
            },
        }
    )


async def start_workers(launcher: ProcessLauncher, env: BenchEnv, ids: list[str]) -> list[dict[str, Any]]:
    slots = asyncio.Semaphore(32)

    async def one(run_id: str) -> dict[str, Any]:
        async with slots:
            run = WorkerRun(
                run_id=run_id, attempt=1, job="bench-mass", env={"RUNHERD_BENCH_TAG": env.tag}, worker_id=run_id
            )
            return await launcher.launch(run)

    return list(await asyncio.gather(*(one(i) for i in ids)))


async def insert_starting(store: Store, ids: list[str], handles: list[dict[str, Any]]) -> float:
    """The runs, STARTING since one timestamp T0; returns T0 (epoch seconds, database clock)."""
    plan = orjson.dumps([{"key": "a", "command": ["true"], "deps": []}]).decode()
    uids = [uuid.UUID(i) for i in ids]
    t0 = await store.pool.fetchval("SELECT clock_timestamp()")
    await store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, priority, tags, steps, root_run_id, status_changed_at) "
        "SELECT u, 'bench-mass', 'STARTING', 1, 0, '{}'::jsonb, $2::jsonb, u, $3 FROM unnest($1::uuid[]) AS u",
        uids,
        plan,
        t0,
    )
    await store.pool.execute(
        "INSERT INTO attempts (run_id, attempt, launcher, handle, launched_at) "
        "SELECT u, 1, 'process', h, $3 FROM unnest($1::uuid[], $2::jsonb[]) AS x(u, h)",
        uids,
        handles,
        t0,
    )
    await store.pool.execute("ANALYZE runs")
    await store.pool.execute("ANALYZE attempts")
    return float(t0.timestamp())


class ExitWatcher:
    """Each worker's exit time, seen by a thread of its own (epoll over a pidfd per worker), so the
    figure is when the process died, not when the busy event loop got round to noticing."""

    def __init__(self, pids: list[int]) -> None:
        self.gone: dict[int, float] = {}
        self._poller = select.epoll()
        self._fds = {os.pidfd_open(pid): pid for pid in pids}
        for fd in self._fds:
            self._poller.register(fd, select.EPOLLIN)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop and len(self.gone) < len(self._fds):
            for fd, _ in self._poller.poll(0.1):
                self.gone.setdefault(self._fds[fd], time.time())
                self._poller.unregister(fd)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for fd in self._fds:
            os.close(fd)
        self._poller.close()


class Timeline:
    """When (epoch seconds) each stage between the decision and the signals happened: the kills
    queued by the sweep, each terminate_many called and returned, each group signalled."""

    def __init__(self) -> None:
        self.queued: list[float] = []
        self.calls: list[tuple[float, float, int]] = []
        self.signalled: list[float] = []

    def install(self, launcher: ProcessLauncher, actions: Actions) -> None:
        from runherd.launchers import process

        inner_killpg = process._killpg
        inner_many = launcher.terminate_many
        inner_soon = actions.terminate_soon

        def killpg(pid: int, sig: int) -> None:
            inner_killpg(pid, sig)
            self.signalled.append(time.time())

        async def many(handles: list[Any], **kw: Any) -> Any:
            began = time.time()
            try:
                return await inner_many(handles, **kw)
            finally:
                self.calls.append((began, time.time(), len(handles)))

        def soon(refs: list[RunRef], why: str, **kw: Any) -> None:
            self.queued.append(time.time())
            inner_soon(refs, why, **kw)

        process._killpg = killpg  # type: ignore[assignment]
        launcher.terminate_many = many  # type: ignore[method-assign]
        actions.terminate_soon = soon  # type: ignore[method-assign]
        self._undo = lambda: setattr(process, "_killpg", inner_killpg)

    def close(self) -> None:
        if hasattr(self, "_undo"):
            self._undo()

    def lines(self, deadline: float, gone: list[float]) -> list[str]:
        out = [f"kills queued by the sweep: {', '.join(ms(t - deadline) for t in self.queued)}"]
        for began, ended, k in self.calls:
            out.append(f"terminate_many of {k}: called {ms(began - deadline)}, returned {ms(ended - deadline)}")
        if self.signalled:
            s = sorted(self.signalled)
            out.append(f"groups signalled: {len(s)}, first {ms(s[0] - deadline)}, last {ms(s[-1] - deadline)}")
        if gone:
            out.append(f"workers gone: first {ms(min(gone))}, last {ms(max(gone))}")
        return out


async def phase(env: BenchEnv, n: int, terminate: bool) -> dict[str, Any]:
    cfg = make_config(env)
    store = await Store.connect(env.db_url)
    launcher = ProcessLauncher(cfg.run_launcher.config)
    timeline = Timeline()
    watcher: ExitWatcher | None = None
    running = None
    try:
        await store.pool.execute("TRUNCATE runs, attempts, events CASCADE")
        ids = [str(uuid.uuid4()) for _ in range(n)]
        if terminate:
            handles = await start_workers(launcher, env, ids)
            env.pids.update(h["pid"] for h in handles)
            watcher = ExitWatcher([h["pid"] for h in handles])
        else:
            handles = [{"launcher": "process", "pid": 0, "host": "-", "run_id": i, "attempt": 1} for i in ids]
        t0 = await insert_starting(store, ids, handles)
        deadline = t0 + START_TIMEOUT
        running = await app.start(cfg, {"monitor": 1}, launcher=launcher)
        monitor = running.services["monitor"][0]
        if not terminate:
            monitor.actions = NoTerminations(store, launcher)  # type: ignore[attr-defined]
            monitor.sweeper.actions = monitor.actions  # type: ignore[attr-defined]
        else:
            timeline.install(launcher, monitor.actions)  # type: ignore[attr-defined]
        uids = [uuid.UUID(i) for i in ids]

        async def all_failed() -> list[Any] | None:
            rows = await store.fetch(
                "SELECT status_changed_at FROM runs WHERE run_id = ANY($1::uuid[]) AND status = 'FAILURE'", uids
            )
            return rows if len(rows) == n else None

        rows = await wait_for(all_failed, START_TIMEOUT + 60, f"{n} runs FAILURE", interval=0.1, running=running)
        failed = [r["status_changed_at"].timestamp() - deadline for r in rows]
        exited: list[float] = []
        recorded: list[float] = []
        if watcher is not None:
            gone = watcher.gone

            async def all_gone() -> bool:
                return len(gone) == n

            await wait_for(all_gone, 60, f"{n} workers gone", interval=0.05, running=running)
            exited = [t - deadline for t in gone.values()]
            await asyncio.wait_for(monitor.actions.idle(), 60)
            rows = await store.fetch(
                "SELECT ts FROM events WHERE run_id = ANY($1::uuid[]) AND type = 'WORKER_TERMINATED'", uids
            )
            recorded = [r["ts"].timestamp() - deadline for r in rows]
        return {"failed": failed, "gone": exited, "recorded": recorded, "timeline": timeline.lines(deadline, exited)}
    finally:
        timeline.close()
        if running is not None:
            await running.close()
        else:
            await launcher.close()
        if watcher is not None:
            watcher.close()
        await store.close()


def raw_kill_ceiling(env: BenchEnv, n: int) -> float:
    """The machine's own ceiling: n `sleep` processes, each its own group, signalled in a loop and
    waited for together (epoll over pidfds); seconds from the first signal to the last exit."""
    procs = [
        subprocess.Popen(["sleep", "600"], start_new_session=True, env={"RUNHERD_BENCH_TAG": env.tag}) for _ in range(n)
    ]
    env.pids.update(p.pid for p in procs)
    poller = select.epoll()
    fds = [os.pidfd_open(p.pid) for p in procs]
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    began = time.perf_counter()
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    left = n
    while left:
        for fd, _ in poller.poll(10):
            poller.unregister(fd)
            left -= 1
    took = time.perf_counter() - began
    for fd in fds:
        os.close(fd)
    for p in procs:
        p.wait()
    return took


def row(name: str, xs: list[float], n: int) -> list[str]:
    if not xs:
        return [name, "n/a", "n/a", "n/a", "n/a"]
    last = max(xs)
    return [name, ms(pct(xs, 50)), ms(pct(xs, 99)), ms(last), f"{n / max(last, 1e-3):,.0f}/s"]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 runs")
    parser.add_argument("-n", type=int, default=None, help="runs (default 1,000)")
    args = parser.parse_args()
    n = args.n or (200 if args.quick else 1000)
    quiet_logs()
    async with bench_env("mass") as env:
        on = await phase(env, n, terminate=True)
        off = await phase(env, n, terminate=False)
        raw = await asyncio.to_thread(raw_kill_ceiling, env, n)
    print(
        f"\n{n:,} runs STARTING with one start deadline ({START_TIMEOUT:g} s); one monitor replica; "
        f"process launcher workers (sleep); {machine()}.\n"
    )
    print(
        table(
            ["past the deadline", "p50", "p99", "max (last)", "runs/s (n / last)"],
            [
                row("termination on: run FAILURE", on["failed"], n),
                row("termination on: worker gone", on["gone"], n),
                row("termination on: WORKER_TERMINATED recorded", on["recorded"], n),
                row("termination off (database-only ceiling): run FAILURE", off["failed"], n),
            ],
        )
    )
    print(
        f"\nraw ceiling: {n:,} `sleep` process groups signalled and reaped by a bare loop in "
        f"{raw * 1000:.0f} ms ({n / raw:,.0f}/s)"
    )
    print("\ntimeline of the termination phase, past the deadline:")
    for line in on["timeline"]:
        print(f"- {line}")
    within = sum(1 for x in on["gone"] if x <= 0.5)
    print(f"\nworkers gone within 0.5 s of the deadline: {within}/{n}; left running: {n - len(on['gone'])}")
    print(f"peak RSS of the bench process {rss()[1]:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
