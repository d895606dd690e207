"""Event ingest throughput: how fast the monitor applies lifecycle events (one active consumer).

R STARTED runs each get S steps' STEP_START + STEP_SUCCESS events, published as a backlog; one
monitor (sweeps off) drains it. Raw ceiling in the same run: plain aio-pika consume + ack with one
asyncpg INSERT of the same rows per batch (no decisions, no transitions).

With ``--shards N`` (sharded event ingest, README), also: for each replica count of ``--replicas``
(default 1,2,3), that many monitor processes with ``event_shards: N``; once every shard has its one
consumer, the database's ``runs`` table is locked (every ingest batch waits), the backlog is
published with its shard headers, and the clock starts when the lock goes.

    .venv/bin/python scripts/bench/events.py [--quick] [--shards 4 --replicas 1,2,3]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import aio_pika  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402

from runherd import app, auth, config  # noqa: E402
from runherd import broker as topology  # noqa: E402
from runherd.broker import Broker  # noqa: E402
from runherd.contract import SHARD_HEADER, Event, EventType, event_shard, now_iso  # noqa: E402
from runherd.store import Store  # noqa: E402
from scripts.bench._benchlib import (  # noqa: E402
    BenchEnv,
    bench_env,
    insert_started_runs,
    machine,
    quiet_logs,
    rate,
    ratio,
    rss,
    table,
)


async def seed(store: Store, runs: int) -> list[str]:
    return await insert_started_runs(store, runs, "bench-events", steps=5)


def bodies(ids: list[str], steps: int) -> list[tuple[str, bytes]]:
    out = []
    ts = now_iso()
    for run_id in ids:
        seq = 0
        for s in range(steps):
            for kind in (EventType.STEP_START, EventType.STEP_SUCCESS):
                seq += 1
                event = Event(
                    run_id=run_id,
                    attempt=1,
                    seq=seq,
                    type=kind,
                    step_key=f"s{s}",
                    data={"output": s} if kind is EventType.STEP_SUCCESS else {},
                    ts=ts,
                )
                out.append((run_id, event.body()))
    return out


async def publish(
    amqp_url: str,
    messages: list[tuple[str, bytes]],
    exchange: str = "runherd.events",
    keys: auth.Keys | None = None,
    shards: int = 1,
) -> None:
    """The backlog, each event with its worker's token (runherd.auth) when ``keys`` are given, and
    its shard header when ``shards`` > 1."""

    def headers(run_id: str) -> dict[str, str]:
        out = {auth.TOKEN_HEADER: auth.token(keys.current, auth.WORKER, run_id, 1)} if keys else {}
        if shards > 1:
            out[SHARD_HEADER] = str(event_shard(run_id, shards))
        return out

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange(exchange)
        for i in range(0, len(messages), 1000):
            await asyncio.gather(
                *(
                    ex.publish(
                        aio_pika.Message(body, delivery_mode=2, headers=headers(run_id)), routing_key=f"run.{run_id}"
                    )
                    for run_id, body in messages[i : i + 1000]
                )
            )


async def runherd_rate(env: BenchEnv, runs: int, steps: int) -> tuple[float, int]:
    cfg = config.from_mapping(
        {"amqp_url": env.amqp_url, "database_url": env.db_url, "run_monitoring": {"enabled": False}}
    )
    store = await Store.connect(env.db_url)
    try:
        ids = await seed(store, runs)
        messages = bodies(ids, steps)
        running = await app.start(cfg, {"monitor": 1})
        await running.close(grace=2)  # declares the topology, then stops: the backlog builds up
        await publish(env.amqp_url, messages, keys=await store.event_keys())
        began = time.perf_counter()
        running = await app.start(cfg, {"monitor": 1})
        try:
            while True:
                n = await store.pool.fetchval("SELECT count(*) FROM events WHERE type = 'STEP_SUCCESS'")
                if n >= runs * steps:
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - began
        finally:
            await running.close(grace=2)
        done = await store.pool.fetchval("SELECT count(*) FROM steps WHERE status = 'SUCCESS'")
        return len(messages) / elapsed, done
    finally:
        await store.close()


def spawn_monitor(env: BenchEnv, config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runherd.cli", "--config", str(config_path), "monitor"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "RUNHERD_BENCH_TAG": env.tag},
        )
    env.pids.add(proc.pid)
    return proc


async def sharded_rate(env: BenchEnv, runs: int, steps: int, shards: int, replicas: int) -> tuple[float, int]:
    """``replicas`` monitor processes sharing ``shards`` event shards drain the backlog."""
    raw = {
        "amqp_url": env.amqp_url,
        "database_url": env.db_url,
        "run_monitoring": {"enabled": False},
        "event_shards": shards,
        "log_level": "WARNING",
    }
    path = env.tmp / f"sharded-{replicas}.yaml"
    path.write_text(yaml.safe_dump(raw))
    store = await Store.connect(env.db_url)
    broker = await Broker.connect(env.amqp_url, event_shards=shards)  # the sharded topology
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ids = await seed(store, runs)
        messages = bodies(ids, steps)
        for i in range(replicas):
            procs.append(spawn_monitor(env, path, env.tmp / f"monitor-{replicas}-{i}.log"))

        async def settled() -> bool:
            live = await store.pool.fetchval(
                "SELECT count(*) FROM monitor_replicas WHERE seen_at > clock_timestamp() - interval '3 seconds'"
            )
            if live != replicas:
                return False
            for shard in range(shards):
                stats = await broker.queue_stats(topology.shard_queue(shard))
                if stats is None or stats[1] != 1:
                    return False
            return True

        deadline = time.monotonic() + 60
        while not await settled():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replicas} monitor replicas did not settle on {shards} shards")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # a full assignment period: nobody is still about to move a shard
        async with store.pool.acquire() as hold:
            tx = hold.transaction()
            await tx.start()
            await hold.execute("LOCK TABLE runs IN EXCLUSIVE MODE")  # every ingest batch waits here
            await publish(env.amqp_url, messages, keys=await store.event_keys(), shards=shards)
            began = time.perf_counter()
            await tx.rollback()
        while True:
            n = await store.pool.fetchval(
                "SELECT count(*) FROM steps WHERE status = 'SUCCESS' AND run_id = ANY($1::uuid[])", ids
            )
            if n >= runs * steps:
                break
            await asyncio.sleep(0.05)
        return len(messages) / (time.perf_counter() - began), n
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await broker.close()
        await store.close()


async def raw_rate(env: BenchEnv, runs: int, steps: int) -> float:
    """Consume + ack the same backlog from a plain queue, inserting each batch's rows in one statement."""
    store = await Store.connect(env.db_url)
    connection = await aio_pika.connect(env.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("raw.events", aio_pika.ExchangeType.TOPIC)
        queue = await channel.declare_queue("raw.events", arguments={"x-queue-type": "quorum"}, durable=True)
        await queue.bind(exchange, "run.*")
        ids = [str(uuid.uuid4()) for _ in range(runs)]
        messages = bodies(ids, steps)
        await publish(env.amqp_url, messages, exchange="raw.events")
        await channel.set_qos(prefetch_count=400)
        total, batch = len(messages), []
        done = asyncio.Event()
        count = 0
        began = time.perf_counter()

        async def flush() -> None:
            nonlocal count
            rows = [orjson.loads(m.body) for m in batch]
            await store.pool.execute(
                "INSERT INTO events (run_id, attempt, source, seq, type, step_key, ts) "
                "SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::text[], $6::text[], "
                "$7::timestamptz[])",
                [uuid.UUID(r["run_id"]) for r in rows],
                [r["attempt"] for r in rows],
                ["raw"] * len(rows),
                [r["seq"] for r in rows],
                [r["type"] for r in rows],
                [r["step_key"] for r in rows],
                [datetime.fromisoformat(r["ts"]) for r in rows],
            )
            await batch[-1].ack(multiple=True)
            count += len(batch)
            batch.clear()
            if count >= total:
                done.set()

        async with queue.iterator() as it:
            async for message in it:
                batch.append(message)
                if len(batch) >= 200 or count + len(batch) >= total:
                    await flush()
                if done.is_set():
                    break
        return total / (time.perf_counter() - began)
    finally:
        await connection.close()
        await store.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 runs (10,000 events)")
    parser.add_argument("--shards", type=int, default=1, help="also measure sharded ingest over N shards")
    parser.add_argument("--replicas", default="1,2,3", help="monitor replica counts for --shards (default 1,2,3)")
    args = parser.parse_args()
    runs, steps = (1000, 5) if args.quick else (4000, 5)
    counts = [int(c) for c in args.replicas.split(",") if c.strip()] if args.shards > 1 else []
    quiet_logs()
    sharded: list[tuple[int, float, int]] = []
    async with bench_env("events") as env:
        ours, applied = await runherd_rate(env, runs, steps)
        for count in counts:
            got, done = await sharded_rate(env, runs, steps, args.shards, count)
            sharded.append((count, got, done))
        raw = await raw_rate(env, runs, steps)
    print(f"\nEvent ingest, {runs:,} runs x {steps} steps x 2 events = {runs * steps * 2:,} events; {machine()}.\n")
    rows = [["runherd monitor (one active consumer: ordered per run)", rate(ours), ratio(ours, raw)]]
    for count, got, _ in sharded:
        label = f"runherd, {args.shards} shards over {count} monitor process{'es' if count > 1 else ''}"
        rows.append([label, rate(got), ratio(got, raw)])
    rows.append(["raw: aio-pika consume + one INSERT per 200 events, no decisions", rate(raw), "1.00x"])
    print(table(["path", "events/s", "ratio"], rows))
    print(f"\nsteps recorded SUCCESS: {applied:,} of {runs * steps:,}; peak RSS {rss()[1]:.0f} MiB")
    for count, _, done in sharded:
        print(f"sharded, {count} replica(s): steps recorded SUCCESS {done:,} of {runs * steps:,}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
