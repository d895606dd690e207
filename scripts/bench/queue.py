"""Dequeue under tag concurrency limits: runherd.store.Store.dequeue against a deep queue.

N QUEUED runs (default 10,000; --quick 2,000) are inserted with one set-based INSERT ... SELECT FROM
unnest(...) per 2,000 rows, with exactly the runs columns that queries.sql `insert_run` writes (job,
status, priority from contract.priority(tags), tags, steps/env from contract.parse_launch, ...) but
without the per-run event-log and status-outbox rows, which dequeue never reads; ``--via-store`` uses
Store.insert_run for every run instead (slower; prints its insert rate). Tags: team in a..e, priority
0..9 (``runherd/priority``), and on every other run database in db00..db49. Limits, in the shape
services/launcher/launching.py passes to dequeue():
max_concurrent_runs 500, {team: a, limit 50}, {database: applyLimitPerUniqueValue, limit 2}.

Each round: time the dequeue SELECT alone (read only), then time one store.dequeue() call (advisory
lock, the SELECT, QUEUED -> STARTING transitions with their events and outbox rows, attempts rows),
check every limit against the in-flight runs, check whether a run that fits was left queued while
slots were free (the read-only SELECT run again after the call must find nothing), then move the F
oldest STARTING runs (``--free``, default 20) to SUCCESS with plain SQL (not timed): after five rounds
the system is saturated and every round dequeues what the freed slots and the limits allow, the
launcher's steady state. Variants, each on the same N runs:

* runherd, with the limits above;
* runherd, with the limits above, two store.dequeue() calls at once each round (two launcher
  replicas; they serialize on the dequeue's advisory lock): the limits must hold all the same;
* runherd, max_concurrent_runs 500 and no tag limits: the cost of runherd's bookkeeping;
* raw ceiling: plain ``SELECT ... ORDER BY priority DESC, created_at LIMIT n FOR UPDATE SKIP
  LOCKED`` + UPDATE to STARTING, one statement, on a copy of the table (same indexes), no tag limits;
  n = min(100, 500 - in flight) computed in the same statement so that it stays comparable once the
  system is saturated. It runs alongside each runherd variant, round for round in turn, so each
  ratio compares two figures taken at the same moments of this shared, noisy machine.

    .venv/bin/python scripts/bench/queue.py [--quick] [-n 10000]
"""

from __future__ import annotations

import os
import sys

# This file is named queue.py: drop its folder from sys.path so it never shadows the stdlib `queue`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402

from runherd import config, contract  # noqa: E402
from runherd.store import Store  # noqa: E402
from runherd.store.queries import dequeue_query  # noqa: E402
from scripts.bench._benchlib import bench_env, machine, ms, pct, quiet_logs, rate, ratio, rss, table  # noqa: E402

BATCH = 100  # store.dequeue's default batch
MAX_CONCURRENT = 500
TEAM_A_LIMIT = 50
DB_LIMIT = 2
IN_FLIGHT = "('STARTING', 'STARTED', 'CANCELING')"

CONFIG = {
    "run_coordinator": {
        "max_concurrent_runs": MAX_CONCURRENT,
        "tag_concurrency_limits": [
            {"key": "team", "value": "a", "limit": TEAM_A_LIMIT},
            {"key": "database", "value": {"applyLimitPerUniqueValue": True}, "limit": DB_LIMIT},
        ],
    },
}


def limits_of(cfg: config.Config) -> list[dict[str, Any]]:
    """Exactly what services/launcher/launching.py Launching.tick passes to Store.dequeue."""
    return [
        {"key": lim.key, "value": lim.value, "per_unique_value": lim.per_unique_value, "limit": lim.limit}
        for lim in cfg.run_coordinator.tag_concurrency_limits
    ]


def launches(n: int, seed: int = 7) -> list[contract.Launch]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        tags: dict[str, Any] = {"team": "abcde"[rnd.randrange(5)], "runherd/priority": rnd.randrange(10)}
        if i % 2 == 0:
            tags["database"] = f"db{rnd.randrange(50):02d}"
        out.append(
            contract.parse_launch(
                {
                    "v": 1,
                    "run_id": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
                    "job": f"etl-{i % 20}",
                    "steps": [
                        {"key": "extract", "command": ["true"]},
                        {"key": "load", "command": ["true"], "deps": ["extract"]},
                    ],
                    "tags": tags,
                }
            )
        )
    return out


async def insert_bulk(store: Store, runs: list[contract.Launch]) -> None:
    base = datetime.now(UTC) - timedelta(hours=1)
    for start in range(0, len(runs), 2000):
        chunk = runs[start : start + 2000]
        await store.pool.execute(
            "INSERT INTO runs (run_id, job, status, priority, tags, steps, env, launcher, max_runtime_seconds, "
            "root_run_id, retry_number, not_before, created_at) "
            "SELECT u.run_id, u.job, 'QUEUED', u.priority, u.tags::jsonb, u.steps::jsonb, '{}'::jsonb, NULL, NULL, "
            "u.run_id, 0, u.created_at, u.created_at "
            "FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::text[], $5::text[], $6::timestamptz[]) "
            "AS u(run_id, job, priority, tags, steps, created_at)",
            [uuid.UUID(r.run_id) for r in chunk],
            [r.job for r in chunk],
            [contract.priority(r.tags) for r in chunk],
            [orjson.dumps(r.tags).decode() for r in chunk],
            [orjson.dumps([s.to_json() for s in r.steps]).decode() for r in chunk],
            [base + timedelta(microseconds=50 * (start + i)) for i in range(len(chunk))],
        )


async def insert_via_store(store: Store, runs: list[contract.Launch]) -> float:
    began = time.perf_counter()
    sem = asyncio.Semaphore(8)

    async def one(launch: contract.Launch) -> None:
        async with sem:
            await store.insert_run(launch, max_runtime_seconds=None, priority=contract.priority(launch.tags))

    await asyncio.gather(*(one(r) for r in runs))
    return len(runs) / (time.perf_counter() - began)


async def reset(store: Store) -> None:
    """Every run back to QUEUED, as freshly inserted; vacuumed and analyzed."""
    await store.pool.execute("TRUNCATE attempts, steps, events, status_outbox")
    await store.pool.execute(
        "UPDATE runs SET status = 'QUEUED', attempt = 0, started_at = NULL, ended_at = NULL, "
        "reason = NULL, status_changed_at = created_at"
    )
    await store.pool.execute("VACUUM ANALYZE runs")
    await store.pool.execute("UPDATE raw_runs SET status = 'QUEUED', attempt = 0, status_changed_at = created_at")
    await store.pool.execute("VACUUM ANALYZE raw_runs")


@dataclass
class Result:
    name: str
    calls: list[float] = field(default_factory=list)  # seconds per dequeue call
    query: list[float] = field(default_factory=list)  # seconds per read-only dequeue SELECT
    moved: int = 0
    rounds: int = 0
    empty_rounds: int = 0
    wall: float = 0.0
    max_total: int = 0
    max_team_a: int = 0
    max_db: int = 0
    violations: int = 0
    window_misses: int = 0  # rounds where a run that fit was left queued
    window_missed_runs: int = 0  # runs that fit (within the batch) but were left queued
    idle_slots: list[int] = field(default_factory=list)  # 500 - in flight, in rounds with a miss

    @property
    def throughput(self) -> float:
        return self.moved / sum(self.calls) if self.calls else 0.0


async def free(store: Store, table_name: str, n: int) -> None:
    await store.pool.execute(
        f"UPDATE {table_name} SET status = 'SUCCESS', ended_at = clock_timestamp(), "
        f"status_changed_at = clock_timestamp() WHERE run_id IN (SELECT run_id FROM {table_name} "
        f"WHERE status = 'STARTING' ORDER BY status_changed_at, run_id LIMIT {n})"
    )


async def check_limits(store: Store, res: Result, with_limits: bool) -> None:
    row = (
        await store.fetch(
            f"SELECT count(*) AS total, count(*) FILTER (WHERE tags->>'team' = 'a') AS team_a, "
            f"coalesce((SELECT max(n) FROM (SELECT count(*) AS n FROM runs WHERE status IN {IN_FLIGHT} "
            f"AND tags ? 'database' GROUP BY tags->>'database') g), 0) AS db_max "
            f"FROM runs WHERE status IN {IN_FLIGHT}"
        )
    )[0]
    res.max_total = max(res.max_total, row["total"])
    res.max_team_a = max(res.max_team_a, row["team_a"])
    res.max_db = max(res.max_db, row["db_max"])
    if with_limits and (row["total"] > MAX_CONCURRENT or row["team_a"] > TEAM_A_LIMIT or row["db_max"] > DB_LIMIT):
        res.violations += 1


async def runherd_round(
    store: Store,
    res: Result,
    max_concurrent: int,
    limits: list[dict[str, Any]],
    per_round: int,
    dequeuers: int,
) -> None:
    """One round of a runherd variant on `runs`."""
    sql = dequeue_query(limits)
    t0 = time.perf_counter()
    await store.pool.fetch(sql, max_concurrent, limits, BATCH)
    t1 = time.perf_counter()
    # With two dequeuers, the call's time is the two calls' together (they run at once).
    calls = await asyncio.gather(*(store.dequeue(max_concurrent, limits) for _ in range(dequeuers)))
    moved = [run_id for call in calls for run_id in call]
    t2 = time.perf_counter()
    res.query.append(t1 - t0)
    res.calls.append(t2 - t1)
    res.moved += len(moved)
    res.rounds += 1
    res.empty_rounds += not moved
    await check_limits(store, res, bool(limits))
    if limits and len(moved) < BATCH:
        # Does the walk, run again, find a run that fits? Then the call left it behind.
        beyond = await store.pool.fetch(sql, max_concurrent, limits, BATCH - len(moved))
        res.window_misses += bool(beyond)
        res.window_missed_runs += len(beyond)
        if beyond:
            in_flight = await store.pool.fetchval(f"SELECT count(*) FROM runs WHERE status IN {IN_FLIGHT}")
            res.idle_slots.append(max_concurrent - in_flight)
    await free(store, "runs", per_round)


RAW_MOVE = (
    "WITH c AS (SELECT run_id FROM raw_runs WHERE status = 'QUEUED' "
    "ORDER BY priority DESC, created_at, run_id "
    f"LIMIT greatest(0, least($1, $2 - (SELECT count(*) FROM raw_runs WHERE status IN {IN_FLIGHT}))) "
    "FOR UPDATE SKIP LOCKED) "
    "UPDATE raw_runs r SET status = 'STARTING', attempt = 1, status_changed_at = clock_timestamp() "
    "FROM c WHERE r.run_id = c.run_id RETURNING r.run_id"
)
RAW_SELECT = "SELECT run_id FROM raw_runs WHERE status = 'QUEUED' ORDER BY priority DESC, created_at, run_id LIMIT $1"


async def raw_round(store: Store, res: Result, per_round: int) -> None:
    """One round of the raw ceiling on its own copy of the table, `raw_runs`."""
    t0 = time.perf_counter()
    await store.pool.fetch(RAW_SELECT, BATCH)
    t1 = time.perf_counter()
    async with store.pool.acquire() as conn, conn.transaction():
        moved = await conn.fetch(RAW_MOVE, BATCH, MAX_CONCURRENT)
    t2 = time.perf_counter()
    res.query.append(t1 - t0)
    res.calls.append(t2 - t1)
    res.moved += len(moved)
    res.rounds += 1
    res.empty_rounds += not moved
    await free(store, "raw_runs", per_round)


async def paired(
    store: Store,
    name: str,
    max_concurrent: int,
    limits: list[dict[str, Any]],
    n: int,
    budget: float,
    per_round: int,
    dequeuers: int = 1,
) -> tuple[Result, Result]:
    """A runherd variant and the raw ceiling, round for round in turn (each on its own table,
    both fresh), so that both see the same moments of a shared, noisy machine and their ratio
    holds even when the load swings between variants."""
    await reset(store)
    res, raw = Result(name), Result("raw ceiling: SELECT … FOR UPDATE SKIP LOCKED + UPDATE (global cap only)")
    began = time.perf_counter()
    while (res.moved < n or raw.moved < n) and time.perf_counter() - began < budget:
        if res.moved < n:
            await runherd_round(store, res, max_concurrent, limits, per_round, dequeuers)
            res.wall = time.perf_counter() - began
        if raw.moved < n:
            await raw_round(store, raw, per_round)
            raw.wall = time.perf_counter() - began
    print(
        f"{name}: {res.rounds} rounds, {res.moved:,} runs, {res.wall:.1f} s; raw alongside: {raw.rounds} rounds",
        flush=True,
    )
    return res, raw


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 runs, under ~40 s")
    parser.add_argument("-n", type=int, default=None, help="queued runs (default 10,000; --quick 2,000)")
    parser.add_argument(
        "--free", type=int, default=20, help="oldest STARTING runs moved to SUCCESS between rounds (default 20)"
    )
    parser.add_argument("--via-store", action="store_true", help="insert with Store.insert_run, one run a call")
    args = parser.parse_args()
    n = args.n or (2_000 if args.quick else 10_000)
    budget = 24.0 if args.quick else 100.0  # seconds per variant and its raw run alongside, at most
    quiet_logs()
    t_start = time.monotonic()
    print(f"# queue: N={n:,}; {machine()}", flush=True)
    cfg = config.from_mapping(CONFIG)
    limits = limits_of(cfg)
    async with bench_env("queue") as env:
        store = await Store.connect(env.db_url, max_size=4)
        try:
            runs = launches(n)
            t = time.perf_counter()
            insert_rate = None
            if args.via_store:
                insert_rate = await insert_via_store(store, runs)
            else:
                await insert_bulk(store, runs)
            print(
                f"inserted {n:,} runs in {time.perf_counter() - t:.1f} s "
                f"({'Store.insert_run' if args.via_store else 'bulk INSERT ... unnest'})",
                flush=True,
            )
            await store.pool.execute("CREATE TABLE raw_runs (LIKE runs INCLUDING ALL)")
            await store.pool.execute("INSERT INTO raw_runs SELECT * FROM runs")
            await store.pool.execute("VACUUM ANALYZE runs")
            await store.pool.execute("VACUUM ANALYZE raw_runs")
            plan = await store.pool.fetch(
                "EXPLAIN (ANALYZE, BUFFERS OFF, TIMING OFF, SUMMARY ON) " + dequeue_query(limits),
                cfg.run_coordinator.max_concurrent_runs,
                limits,
                BATCH,
            )
            first_plan = next((r[0] for r in plan if "Execution Time" in r[0]), "")

            limited, raw = await paired(
                store,
                "runherd Store.dequeue, with the limits",
                cfg.run_coordinator.max_concurrent_runs,
                limits,
                n,
                budget,
                args.free,
            )
            concurrent, raw2 = await paired(
                store,
                "runherd Store.dequeue, with the limits, 2 dequeuers at once",
                cfg.run_coordinator.max_concurrent_runs,
                limits,
                n,
                budget,
                args.free,
                dequeuers=2,
            )
            unlimited, raw3 = await paired(
                store,
                "runherd Store.dequeue, global cap only (no tag limits)",
                MAX_CONCURRENT,
                [],
                n,
                budget,
                args.free,
            )
        finally:
            await store.close()
    elapsed = time.monotonic() - t_start

    print()
    print(
        f"Dequeue, N={n:,} queued runs, batch {BATCH}, max_concurrent_runs {MAX_CONCURRENT}; "
        f"{args.free} oldest STARTING runs → SUCCESS between rounds (so the system stays saturated); "
        f"{os.cpu_count()} CPUs, PostgreSQL on the same machine. runs/s = runs dequeued / time "
        f"inside the dequeue calls. Each variant ran round for round in turn with the raw ceiling "
        f"(its own copy of the table), and its ratios are against that raw run."
    )
    print()
    rows = []
    for r, rr in ((limited, raw), (concurrent, raw2), (unlimited, raw3)):
        for x in (r, rr):
            rows.append(
                [
                    x.name if x is r else "… raw ceiling alongside",
                    x.rounds,
                    f"{x.moved:,}",
                    ms(pct(x.query, 50)),
                    ms(pct(x.calls, 50)),
                    ms(pct(x.calls, 99)),
                    rate(x.throughput),
                    ratio(pct(x.calls, 50), pct(rr.calls, 50)),
                    ratio(x.throughput, rr.throughput),
                ]
            )
    print(
        table(
            [
                "variant",
                "rounds",
                "runs dequeued",
                "SELECT alone p50",
                "dequeue call p50",
                "dequeue call p99",
                "runs/s",
                "call p50 / raw",
                "runs/s / raw",
            ],
            rows,
        )
    )
    print()
    print(
        table(
            ["limit", "configured", "max in flight seen (1 dequeuer / 2 at once)", "exceeded"],
            [
                [
                    name,
                    cap,
                    f"{seen(limited)} / {seen(concurrent)}",
                    "no" if max(seen(limited), seen(concurrent)) <= cap else "YES",
                ]
                for name, cap, seen in (
                    ("max_concurrent_runs", MAX_CONCURRENT, lambda r: r.max_total),
                    ("team=a", TEAM_A_LIMIT, lambda r: r.max_team_a),
                    ("database (per unique value)", DB_LIMIT, lambda r: r.max_db),
                )
            ],
        )
    )
    print()
    for r in (limited, concurrent):
        print(
            f"{r.name}: limit violations after a round: {r.violations} of {r.rounds} rounds "
            f"({'no limit was ever exceeded' if r.violations == 0 else 'LIMITS EXCEEDED'}); "
            f"rounds that returned fewer than {BATCH} while a run that fit was left queued: {r.window_misses} "
            f"({r.window_missed_runs:,} runs); rounds that dequeued nothing: {r.empty_rounds}"
        )
    print(
        f"runherd with the limits: {rate(limited.throughput)}, {ratio(limited.throughput, raw.throughput)} the raw "
        f"ceiling ({rate(raw.throughput)}) run alongside; 2 dequeuers at once: {rate(concurrent.throughput)}, "
        f"{ratio(concurrent.throughput, raw2.throughput)} (raw alongside {rate(raw2.throughput)})"
    )
    print(f"EXPLAIN ANALYZE of the dequeue SELECT on the full queue: {first_plan.strip()}")
    if insert_rate:
        print(f"Store.insert_run: {insert_rate:,.0f} runs/s (8 concurrent)")
    print(f"peak RSS {rss()[1]:.0f} MiB; total time {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
