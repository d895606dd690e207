"""Heartbeat ingest throughput: worker heartbeats -> runherd.heartbeats -> heartbeat service -> PostgreSQL.

R = 10,000 live attempts (runs STARTED on attempt 1, attempts rows with a handle) are inserted
directly. H heartbeats (default 200,000; --quick 30,000), bodies from contract.heartbeat_body,
round-robin over the R attempts, are published (transient, publisher confirms, plain aio-pika) to the
``runherd.heartbeats`` exchange in chunks of at most 90,000 while no consumer runs: the queue is
bounded at 100,000 with drop-head, so a bigger backlog would be dropped. Then N heartbeat replicas
start in-process (runherd.app.start({"heartbeat": N})) and drain the chunk; the services are closed
and the next chunk is published. Ingest rate = heartbeats committed (counted by wrapping
HeartbeatService.write in this process; the service acks after its commit) / time from the first
batch handed to write() to the last commit, summed over chunks. Checked afterwards: every published
heartbeat was committed and every attempt's last_heartbeat_at is set.

Raw ceilings, same process, same sizes:

* plain aio-pika consume of the same backlog, prefetch 2,000 (as the service), one ack per message
  (as runherd's Broker.ack), and again with one ``multiple=True`` ack per 1,000, no database;
* one plain asyncpg UPDATE ... FROM unnest(...) per batch of 1,000 beats (the service's batch
  size), no broker; and runherd's own Store.record_heartbeats on the same batches, no broker.

    .venv/bin/python scripts/bench/heartbeats.py [--quick] [-H 200000] [--replicas 2]
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
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402

import aio_pika  # noqa: E402
import orjson  # noqa: E402

from runherd import app, auth, config, contract  # noqa: E402
from runherd import broker as topology  # noqa: E402
from runherd.broker import Broker  # noqa: E402
from runherd.heartbeat import service as heartbeat_service  # noqa: E402
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

R = 10_000
CHUNK = 90_000  # below the queue's x-max-length (100,000): nothing is dropped
BATCH = heartbeat_service.BATCH_SIZE


@dataclass
class Counter:
    committed: int = 0
    batches: int = 0
    first: float | None = None
    last: float = 0.0
    sizes: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.committed, self.batches, self.first, self.last, self.sizes = 0, 0, None, 0.0, []


COUNT = Counter()


def count_commits() -> None:
    """Wrap HeartbeatService.write in this process: it acks after the commit, so when it returns the
    batch is committed."""
    original = heartbeat_service.HeartbeatService.write

    async def write(self: Any, batch: list[Any]) -> int:
        if COUNT.first is None:
            COUNT.first = time.perf_counter()
        touched = await original(self, batch)
        COUNT.committed += len(batch)
        COUNT.batches += 1
        COUNT.sizes.append(len(batch))
        COUNT.last = time.perf_counter()
        return touched

    heartbeat_service.HeartbeatService.write = write  # type: ignore[method-assign]


TOKENS: dict[str, str] = {}  # run id -> its worker's token (runherd.auth), as a worker would send it


async def insert_live_attempts(store: Store, r: int) -> list[str]:
    ids = await insert_started_runs(store, r, "bench-hb")
    keys = await store.event_keys()
    TOKENS.update({run_id: auth.token(keys.current, auth.WORKER, run_id, 1) for run_id in ids})
    return ids


def bodies(ids: list[str], n: int, offset: int) -> list[tuple[bytes, str]]:
    picked = [ids[(offset + i) % len(ids)] for i in range(n)]
    return [(contract.heartbeat_body(run_id, 1), TOKENS[run_id]) for run_id in picked]


async def publish(env: BenchEnv, payloads: list[tuple[bytes, str]]) -> float:
    """Publishes on the heartbeats exchange (no confirms: the queue depth is checked instead, since
    publishing is set-up here, not what is measured); returns messages/s."""
    conn = await aio_pika.connect(env.amqp_url)
    try:
        channel = await conn.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(topology.HEARTBEATS, ensure=False)
        began = time.perf_counter()
        for start in range(0, len(payloads), 1000):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            b,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                            headers={auth.TOKEN_HEADER: token},
                        ),
                        routing_key="hb",
                    )
                    for b, token in payloads[start : start + 1000]
                )
            )
        depth, deadline = -1, time.monotonic() + 30
        while depth != len(payloads):
            if time.monotonic() > deadline:
                raise RuntimeError(f"published {len(payloads)} heartbeats but the queue holds {depth}")
            await asyncio.sleep(0.05)
            queue = await channel.declare_queue(topology.HEARTBEATS_QUEUE, passive=True)
            depth = queue.declaration_result.message_count
        return len(payloads) / (time.perf_counter() - began)
    finally:
        await conn.close()


async def runherd_ingest(
    env: BenchEnv, cfg: config.Config, ids: list[str], h: int, replicas: int, offset: int
) -> dict[str, Any]:
    elapsed, committed, pub_rates, sizes = 0.0, 0, [], []
    peak_rss = 0.0
    done = 0
    while done < h:
        n = min(CHUNK, h - done)
        pub_rates.append(await publish(env, bodies(ids, n, offset + done)))
        rss_published = rss()[0]
        COUNT.reset()
        running = await app.start(cfg, {"heartbeat": replicas})
        try:
            deadline = time.monotonic() + 150
            while COUNT.committed < n:
                if running.supervisor.stop.is_set():
                    raise RuntimeError(f"heartbeat service stopped: {running.supervisor.failure!r}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {COUNT.committed} of {n} heartbeats committed after 150 s")
                await asyncio.sleep(0.02)
            peak_rss = max(peak_rss, rss()[0])
        finally:
            await running.close()
        assert COUNT.first is not None
        elapsed += COUNT.last - COUNT.first
        committed += COUNT.committed
        sizes += COUNT.sizes
        done += n
    return {
        "rss_published": rss_published,
        "rate": committed / elapsed,
        "committed": committed,
        "publish_rate": min(pub_rates),
        "mean_batch": sum(sizes) / len(sizes),
        "rss": peak_rss,
        "elapsed": elapsed,
    }


async def raw_consume(env: BenchEnv, ids: list[str], n: int, ack_every: int) -> float:
    """Plain aio-pika: prefetch 2,000, ack one by one (ack_every=1) or multiple=True every N."""
    await publish(env, bodies(ids, n, 0))
    conn = await aio_pika.connect(env.amqp_url)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=2 * BATCH)
        queue = await channel.get_queue(topology.HEARTBEATS_QUEUE, ensure=False)
        got = 0
        finished = asyncio.Event()
        first: list[float] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            if not first:
                first.append(time.perf_counter())
            got += 1
            if ack_every == 1:
                await message.ack()
            elif got % ack_every == 0 or got == n:
                await message.ack(multiple=True)
            if got == n:
                finished.set()

        tag = await queue.consume(on_message)
        await asyncio.wait_for(finished.wait(), 120)
        took = time.perf_counter() - first[0]
        await queue.cancel(tag)
        return n / took
    finally:
        await conn.close()


async def raw_db(store: Store, ids: list[str], h: int) -> tuple[float, float]:
    """(plain UPDATE per batch of 1,000, Store.record_heartbeats per batch of 1,000), heartbeats/s."""
    beats = []
    for i in range(h):
        run_id = ids[i % len(ids)]
        beats.append((run_id, 1, datetime.fromisoformat(orjson.loads(contract.heartbeat_body(run_id, 1))["ts"])))
    plain_sql = (
        "UPDATE attempts a SET last_heartbeat_at = u.ts "
        "FROM unnest($1::uuid[], $2::timestamptz[]) AS u(run_id, ts) "
        "WHERE a.run_id = u.run_id AND a.attempt = 1"
    )
    batches = [beats[s : s + BATCH] for s in range(0, h, BATCH)]
    began = time.perf_counter()
    for batch in batches:
        await store.pool.execute(plain_sql, [uuid.UUID(b[0]) for b in batch], [b[2] for b in batch])
    plain = h / (time.perf_counter() - began)
    began = time.perf_counter()
    for batch in batches:
        await store.record_heartbeats(batch)
    runherd = h / (time.perf_counter() - began)
    return plain, runherd


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30,000 heartbeats, under ~40 s")
    parser.add_argument("-H", type=int, default=None, help="heartbeats (default 200,000; --quick 30,000)")
    parser.add_argument("--replicas", default=None, help="comma-separated replica counts (default 2; --quick 1,2)")
    args = parser.parse_args()
    h = args.H or (30_000 if args.quick else 200_000)
    replica_counts = [int(x) for x in (args.replicas or ("1,2" if args.quick else "2")).split(",")]
    raw_n = min(h, CHUNK)
    quiet_logs()
    t_start = time.monotonic()
    print(f"# heartbeats: H={h:,} over R={R:,} live attempts, replicas {replica_counts}; {machine()}", flush=True)
    count_commits()
    async with bench_env("heartbeats") as env:
        cfg = config.from_mapping({"amqp_url": env.amqp_url, "database_url": env.db_url})
        store = await Store.connect(env.db_url)
        broker = await Broker.connect(env.amqp_url)  # declares the topology, the bounded queue included
        try:
            ids = await insert_live_attempts(store, R)
            base_rss = rss()[0]
            results = {}
            for i, n in enumerate(replica_counts):
                results[n] = await runherd_ingest(env, cfg, ids, h, n, offset=i)
                print(
                    f"runherd x{n}: {results[n]['committed']:,} committed in {results[n]['elapsed']:.1f} s", flush=True
                )
            stale = await store.pool.fetchval("SELECT count(*) FROM attempts WHERE last_heartbeat_at IS NULL")
            raw_each = await raw_consume(env, ids, raw_n, 1)
            raw_multi = await raw_consume(env, ids, raw_n, BATCH)
            print("raw consume done", flush=True)
            db_plain, db_runherd = await raw_db(store, ids, h)
        finally:
            await broker.close()
            await store.close()
    elapsed = time.monotonic() - t_start

    print()
    print(
        f"Heartbeat ingest, H={h:,} heartbeats over R={R:,} live attempts, backlog drained in chunks of ≤ "
        f"{CHUNK:,} (bounded queue), batch {BATCH}; replicas in one process; {os.cpu_count()} CPUs, RabbitMQ "
        f"and PostgreSQL on the same machine. Ratios: runherd's rate against each raw ceiling."
    )
    print()
    rows = []
    for n, r in results.items():
        rows.append(
            [
                f"runherd heartbeat service x{n}",
                f"{r['committed']:,}",
                rate(r["rate"]),
                ratio(r["rate"], raw_each),
                ratio(r["rate"], raw_multi),
                ratio(r["rate"], db_plain),
                f"{r['mean_batch']:.0f}",
                f"{r['rss']:.0f} MiB",
            ]
        )
    rows.append(["raw: aio-pika consume + ack each, no DB", f"{raw_n:,}", rate(raw_each), "1.00x", "", "", "", ""])
    rows.append(
        [
            f"raw: aio-pika consume + ack multiple per {BATCH}, no DB",
            f"{raw_n:,}",
            rate(raw_multi),
            "",
            "1.00x",
            "",
            "",
            "",
        ]
    )
    rows.append(
        [
            f"raw: asyncpg UPDATE … unnest per {BATCH}, no broker",
            f"{h:,}",
            rate(db_plain),
            "",
            "",
            "1.00x",
            f"{BATCH}",
            "",
        ]
    )
    rows.append(
        [
            f"runherd Store.record_heartbeats per {BATCH}, no broker",
            f"{h:,}",
            rate(db_runherd),
            "",
            "",
            ratio(db_runherd, db_plain),
            f"{BATCH}",
            "",
        ]
    )
    print(
        table(
            [
                "path",
                "heartbeats",
                "rate",
                "/ raw consume (ack each)",
                "/ raw consume (ack multiple)",
                "/ raw UPDATE",
                "mean batch",
                "RSS while draining",
            ],
            rows,
        )
    )
    print()
    for n, r in results.items():
        print(
            f"x{n}: backlog published (plain aio-pika, until queued) at ≥ {r['publish_rate']:,.0f}/s; RSS after "
            f"publishing the last chunk {r['rss_published']:.0f} MiB, while draining it {r['rss']:.0f} MiB"
        )
    print(
        f"attempts never heartbeated after the runs: {stale} of {R:,} (expected 0); every published heartbeat "
        f"was committed: {all(r['committed'] == h for r in results.values())}"
    )
    cur, peak = rss()
    print(
        f"RSS of the bench process (services in-process): {base_rss:.0f} MiB before any heartbeat, "
        f"{cur:.0f} MiB at the end, {peak:.0f} MiB peak (includes the bench's own backlog of bodies); "
        f"total time {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
