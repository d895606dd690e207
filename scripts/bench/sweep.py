"""What one monitor sweep costs with 10,000 runs in flight (and many finished ones behind them).

Seeds N STARTED runs with fresh heartbeats (nothing to act on: the steady state of a busy fleet),
plus F finished runs, then times a sweep round (Sweeper.sweep(): the rule deadlines, the due rules,
the reap claim; then the sleep from the same deadlines) against what a round cost before the
deadlines picked the rules (every rule unconditionally, then the deadlines). Raw ceiling in the same
run: the bare join a heartbeat rule needs (STARTED runs to their attempts, one comparison), without
locks or actions.

    .venv/bin/python scripts/bench/sweep.py [--quick]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import orjson  # noqa: E402

from runherd import config  # noqa: E402
from runherd.launchers.process import ProcessLauncher  # noqa: E402
from runherd.monitor.actions import Actions  # noqa: E402
from runherd.monitor.sweeper import Sweeper  # noqa: E402
from runherd.store import Store  # noqa: E402
from scripts.bench._benchlib import bench_env, machine, ms, pct, quiet_logs, ratio, rss, table  # noqa: E402

# The least work a heartbeat rule can do: join the in-flight runs to their current attempt and compare.
RAW = (
    "SELECT count(*) FROM runs r JOIN attempts a ON a.run_id = r.run_id AND a.attempt = r.attempt "
    "WHERE r.status = 'STARTED' AND a.last_heartbeat_at < now() - interval '30 seconds'"
)


async def seed(store: Store, started: int, finished: int) -> None:
    steps = orjson.dumps([{"key": "a", "command": ["true"], "deps": []}]).decode()
    for status, n in (("STARTED", started), ("SUCCESS", finished)):
        for i in range(0, n, 5000):
            ids = [uuid.uuid4() for _ in range(min(5000, n - i))]
            await store.pool.execute(
                "INSERT INTO runs (run_id, job, status, attempt, steps, root_run_id, started_at, ended_at, "
                "tags) SELECT u, 'bench-sweep', $2, 1, $3::jsonb, u, now(), "
                "CASE WHEN $2 = 'SUCCESS' THEN now() END, jsonb_build_object('runherd/max_runtime', 3600) "
                "FROM unnest($1::uuid[]) AS u",
                ids,
                status,
                steps,
            )
            await store.pool.execute(
                "INSERT INTO attempts (run_id, attempt, handle, launched_at, last_heartbeat_at, exited_at) "
                'SELECT u, 1, \'{"launcher": "process", "pid": 0}\'::jsonb, now(), now(), '
                "CASE WHEN $2 = 'SUCCESS' THEN now() END FROM unnest($1::uuid[]) AS u",
                ids,
                status,
            )
    await store.pool.execute("UPDATE runs SET max_runtime_seconds = 3600 WHERE status = 'STARTED'")
    # Started a minute ago: a settled fleet, whose pass over the STARTED runs a sweep may reuse.
    await store.pool.execute("UPDATE runs SET status_changed_at = now() - interval '1 minute'")
    await store.pool.execute("VACUUM ANALYZE runs")
    await store.pool.execute("VACUUM ANALYZE attempts")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 in flight, 20,000 finished")
    args = parser.parse_args()
    started, finished, rounds = (2_000, 20_000, 30) if args.quick else (10_000, 100_000, 50)
    quiet_logs()
    async with bench_env("sweep") as env:
        cfg = config.from_mapping(
            {
                "database_url": env.db_url,
                "amqp_url": env.amqp_url,
                "run_monitoring": {"heartbeat_timeout_seconds": 30, "max_runtime_seconds": 0},
            }
        )
        store = await Store.connect(env.db_url)
        try:
            await seed(store, started, finished)
            launcher = ProcessLauncher({"log_dir": str(env.tmp)})
            sweeper = Sweeper(cfg, store, launcher, Actions(store, launcher))
            cycles, fresh, unconditional, raw = [], [], [], []
            per_rule: dict[str, list[float]] = {}
            rules = {
                "start_timeout": sweeper.start_timeout,
                "cancel_timeout": sweeper.cancel_timeout,
                "max_runtime": sweeper.max_runtime,
                "heartbeat_timeout": sweeper.heartbeat_timeout,
                "reap": sweeper.reap,
                "retries": sweeper.retries,
            }
            mon = cfg.run_monitoring
            for _ in range(rounds):
                # What a sweep loop pays per round now: the deadlines, the due rules (none), the reap
                # claim, and its sleep (from the same deadlines, as nothing was acted on).
                t = time.perf_counter()
                counts = await sweeper.sweep()
                await sweeper.seconds_to_next_deadline()
                cycles.append(time.perf_counter() - t)
                assert not any(counts.values()), counts  # the steady state: nothing to act on
                # A round just after a run became STARTED: the pass over the STARTED runs read afresh.
                t = time.perf_counter()
                await store.rule_deadlines(
                    mon.heartbeat_timeout_seconds, sweeper.start_grace, 180, 180, mon.max_runtime_seconds
                )
                await sweeper.reap()
                fresh.append(time.perf_counter() - t)
                # What it paid before: every rule unconditionally, then the deadlines for the sleep.
                t = time.perf_counter()
                for name, rule in rules.items():
                    began = time.perf_counter()
                    await rule()
                    per_rule.setdefault(name, []).append(time.perf_counter() - began)
                await store.rule_deadlines(
                    mon.heartbeat_timeout_seconds, sweeper.start_grace, 180, 180, mon.max_runtime_seconds
                )
                unconditional.append(time.perf_counter() - t)
                t = time.perf_counter()
                await store.pool.fetchval(RAW)
                raw.append(time.perf_counter() - t)
        finally:
            await store.close()
    print(
        f"\nOne monitor sweep, {started:,} runs STARTED (fresh heartbeats), {finished:,} finished; "
        f"{rounds} sweeps; {machine()}.\n"
    )
    print(
        table(
            ["what", "p50", "p99", "p50 / raw"],
            [
                [
                    "a sweep round (settled fleet): the deadlines, the due rules, reap, the sleep",
                    ms(pct(cycles, 50)),
                    ms(pct(cycles, 99)),
                    ratio(pct(cycles, 50), pct(raw, 50)),
                ],
                [
                    "a round that reads the STARTED runs afresh (a run has just started)",
                    ms(pct(fresh, 50)),
                    ms(pct(fresh, 99)),
                    ratio(pct(fresh, 50), pct(raw, 50)),
                ],
                [
                    "before: every rule unconditionally, then the deadlines for the sleep",
                    ms(pct(unconditional, 50)),
                    ms(pct(unconditional, 99)),
                    ratio(pct(unconditional, 50), pct(raw, 50)),
                ],
                ["raw: the bare runs-attempts join of a heartbeat rule", ms(pct(raw, 50)), ms(pct(raw, 99)), "1.00x"],
            ],
        )
    )
    print("\nper rule run unconditionally, p50: " + ", ".join(f"{k} {ms(pct(v, 50))}" for k, v in per_rule.items()))
    print(f"\npeak RSS of the bench process {rss()[1]:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
