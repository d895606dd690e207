"""Crash and hang detection latency on the process launcher.

Services run in-process (runherd.app.start: launcher, heartbeat, monitor, one each) against a private
database and vhost, with run_monitoring poll_interval_seconds 1, heartbeat_interval_seconds 0.5,
heartbeat_timeout_seconds 3, max_resume_run_attempts 3, and the process launcher (default
terminate_grace_seconds, 10 s). Each run has one step, ``sh -c 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then
sleep 600; fi'``: attempt 1 blocks, the resumed attempt 2 succeeds at once.

Phases (K runs each; launched through the public ``launch`` command):

* crash  -- every worker SIGKILLed in one burst. Measured from the kill (local wall clock) to the
  launcher's WORKER_EXITED report (events.ts), to the resume decision (attempts.created_at of attempt
  2: the transaction start of the monitor batch that decided it) and to the new worker being launched
  (attempts.launched_at of attempt 2). DB and local clocks are the same machine's.
* hang-burst  -- every worker SIGSTOPped at once. Measured from the heartbeat deadline
  (attempt 1's last_heartbeat_at + heartbeat_timeout_seconds) to the decision and the launch.
* hang-spread -- the same with the SIGSTOPs spread evenly over ``--spread`` seconds, so the hangs fall
  into different sweeps (what happens when workers hang independently).

Raw ceiling: a plain aio-pika publish (persistent, publisher confirm, quorum queue) -> consume -> one
asyncpg UPDATE -> ack, sequentially, p50/p99.

    .venv/bin/python scripts/bench/detect.py [--quick] [-k 50]
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
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import aio_pika  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402

from runherd import app, config  # noqa: E402
from runherd.broker import Broker  # noqa: E402
from runherd.store import Store  # noqa: E402
from scripts.bench._benchlib import (  # noqa: E402
    BenchEnv,
    bench_env,
    machine,
    ms,
    numeric_bug_present,
    patch_numeric_codec,
    pct,
    proc_state,
    quiet_logs,
    ratio,
    rss,
    table,
    tagged_pids,
    wait_for,
)

POLL = 1.0
HB_INTERVAL = 0.5
HB_TIMEOUT = 3.0
STEP = {"key": "sleepy", "command": ["sh", "-c", 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then sleep 600; fi']}


def make_config(env: BenchEnv, fork_server: bool = False) -> config.Config:
    return config.from_mapping(
        {
            "amqp_url": env.amqp_url,
            "database_url": env.db_url,
            "run_monitoring": {
                "poll_interval_seconds": POLL,
                "heartbeat_interval_seconds": HB_INTERVAL,
                "heartbeat_timeout_seconds": HB_TIMEOUT,
                "max_resume_run_attempts": 3,
            },
            "run_launcher": {
                "name": "process",
                "config": {"log_dir": str(env.tmp / "logs"), "fork_server": fork_server},
            },
        }
    )


async def submit(broker: Broker, env: BenchEnv, k: int, job: str) -> list[str]:
    ids = []
    for _ in range(k):
        run_id = str(uuid.uuid4())
        body = {
            "v": 1,
            "run_id": run_id,
            "job": job,
            "steps": [STEP],
            "tags": {},
            "env": {"RUNHERD_BENCH_TAG": env.tag},
        }
        await broker.publish_command("launch", orjson.dumps(body))
        ids.append(run_id)
    return ids


async def started_workers(
    store: Store, ids: list[str], need_heartbeat: bool, timeout: float, running: Any = None
) -> dict[str, int]:
    """run_id -> pid once every run is STARTED on attempt 1 with a worker handle (and a heartbeat)."""
    uids = [uuid.UUID(i) for i in ids]

    async def check() -> dict[str, int] | None:
        rows = await store.fetch(
            "SELECT r.run_id, (a.handle->>'pid')::int AS pid, a.last_heartbeat_at FROM runs r "
            "JOIN attempts a ON a.run_id = r.run_id AND a.attempt = 1 "
            "WHERE r.run_id = ANY($1::uuid[]) AND r.status = 'STARTED' AND r.attempt = 1 "
            "AND a.handle IS NOT NULL",
            uids,
        )
        ok = {str(r["run_id"]): r["pid"] for r in rows if r["last_heartbeat_at"] or not need_heartbeat}
        return ok if len(ok) == len(ids) else None

    return await wait_for(check, timeout, f"{len(ids)} runs STARTED with a worker", interval=0.2, running=running)


async def second_attempts(store: Store, ids: list[str], timeout: float, running: Any = None) -> list[dict[str, Any]]:
    uids = [uuid.UUID(i) for i in ids]

    async def check() -> list[dict[str, Any]] | None:
        rows = await store.fetch(
            "SELECT a2.run_id, a2.created_at, a2.launch_claimed_at, a2.launched_at, a1.last_heartbeat_at, "
            "(a2.handle->>'start_time')::bigint AS start_ticks, "
            "(SELECT min(e.ts) FROM events e WHERE e.run_id = a2.run_id AND e.attempt = 1 "
            " AND e.type = 'WORKER_EXITED') AS exit_reported "
            "FROM attempts a2 JOIN attempts a1 ON a1.run_id = a2.run_id AND a1.attempt = 1 "
            "WHERE a2.run_id = ANY($1::uuid[]) AND a2.attempt = 2 AND a2.launched_at IS NOT NULL",
            uids,
        )
        return rows if len(rows) == len(ids) else None

    return await wait_for(check, timeout, f"attempt 2 of {len(ids)} runs launched", interval=0.2, running=running)


async def settle(store: Store, ids: list[str], timeout: float, running: Any = None) -> int:
    """Waits for the resumed runs to finish; returns how many succeeded."""
    uids = [uuid.UUID(i) for i in ids]

    async def check() -> list[dict[str, Any]] | None:
        rows = await store.fetch(
            "SELECT status FROM runs WHERE run_id = ANY($1::uuid[]) AND status IN ('SUCCESS', 'FAILURE', 'CANCELED')",
            uids,
        )
        return rows if len(rows) == len(ids) else None

    rows = await wait_for(check, timeout, "resumed runs to finish", interval=0.25, running=running)
    return sum(1 for r in rows if r["status"] == "SUCCESS")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def boot_time() -> float:
    """The machine's boot time (epoch seconds), which a process's start time in /proc counts from:
    now minus /proc/uptime, to 10 ms (/proc/stat's btime is whole seconds)."""
    with open("/proc/uptime") as f:
        return time.time() - float(f.read().split()[0])


def worker_memory(pid: int) -> tuple[float, float] | None:
    """(PSS, USS) of one worker in MiB, from /proc/<pid>/smaps_rollup."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for row in f:
                parts = row.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return None
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Pss", 0) / 1024, uss / 1024


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def fork_server_spares(workers: set[int]) -> list[int]:
    """The fork server's children that are not workers: its spares (none when workers are exec'd)."""
    servers = {_ppid(p) for p in workers} - {None, os.getpid(), 1}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in workers and _ppid(int(entry)) in servers:
            found.append(int(entry))
    return found


def orphans(env: BenchEnv, attempt: int) -> list[str]:
    """Live processes of attempt ``attempt`` (workers or their steps) left behind, as "comm(ppid)"."""
    out = []
    for pid in tagged_pids(env.tag):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                vars_ = f.read().split(b"\0")
        except OSError:
            continue
        if f"RUNHERD_ATTEMPT={attempt}".encode() in vars_ and proc_state(pid) not in (None, "Z"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                comm, ppid = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()[1]
            except (OSError, ValueError, IndexError):
                continue
            out.append(f"{comm}(ppid {ppid})")
    return out


async def crash_phase(env: BenchEnv, running: Any, store: Store, broker: Broker, k: int) -> dict[str, Any]:
    ids = await submit(broker, env, k, "bench-crash")
    pids = await started_workers(store, ids, need_heartbeat=False, timeout=120, running=running)
    await asyncio.sleep(0.5)  # let the boot storm of K Python workers calm down
    memory = [m for m in (worker_memory(pids[run_id]) for run_id in ids) if m is not None]
    spare_memory = [m for m in (worker_memory(p) for p in fork_server_spares(set(pids.values()))) if m is not None]
    killed: dict[str, float] = {}
    for run_id in ids:
        env.pids.add(pids[run_id])
        t = time.time()
        os.kill(pids[run_id], signal.SIGKILL)
        killed[run_id] = t
    rows = await second_attempts(store, ids, timeout=120, running=running)
    res = {
        "exit_reported": [
            r["exit_reported"].timestamp() - killed[str(r["run_id"])] for r in rows if r["exit_reported"] is not None
        ],
        "decision": [r["created_at"].timestamp() - killed[str(r["run_id"])] for r in rows],
        "launched": [r["launched_at"].timestamp() - killed[str(r["run_id"])] for r in rows],
        "claimed": [
            r["launch_claimed_at"].timestamp() - killed[str(r["run_id"])] for r in rows if r["launch_claimed_at"]
        ],
        "forked": [
            boot_time() + r["start_ticks"] / CLK_TCK - killed[str(r["run_id"])]
            for r in rows
            if r["start_ticks"] is not None
        ],
    }
    res["memory"] = memory
    res["spare_memory"] = spare_memory
    res["succeeded"] = await settle(store, ids, timeout=120, running=running)  # so every RUN_START is in
    started = await store.fetch(
        "SELECT run_id, min(ts) AS ts FROM events WHERE run_id = ANY($1::uuid[]) AND attempt = 2 "
        "AND type = 'RUN_START' GROUP BY run_id",
        [uuid.UUID(i) for i in ids],
    )
    res["started"] = [r["ts"].timestamp() - killed[str(r["run_id"])] for r in started]
    await asyncio.sleep(1.0)
    res["orphans"] = orphans(env, 1)
    return res


async def hang_phase(
    env: BenchEnv, running: Any, store: Store, broker: Broker, k: int, spread: float
) -> dict[str, Any]:
    ids = await submit(broker, env, k, f"bench-hang-{'spread' if spread else 'burst'}")
    pids = await started_workers(store, ids, need_heartbeat=True, timeout=120, running=running)
    await asyncio.sleep(1.0)
    stopped: dict[str, float] = {}
    began = time.monotonic()
    for i, run_id in enumerate(ids):
        if spread:
            await asyncio.sleep(max(0.0, began + spread * i / max(1, k - 1) - time.monotonic()))
        env.pids.add(pids[run_id])
        stopped[run_id] = time.time()
        os.kill(pids[run_id], signal.SIGSTOP)
    rows = await second_attempts(store, ids, timeout=120 + spread, running=running)
    deadline = {str(r["run_id"]): r["last_heartbeat_at"].timestamp() + HB_TIMEOUT for r in rows}
    res = {
        "decision": [r["created_at"].timestamp() - deadline[str(r["run_id"])] for r in rows],
        "launched": [r["launched_at"].timestamp() - deadline[str(r["run_id"])] for r in rows],
        "stop_to_decision": [r["created_at"].timestamp() - stopped[str(r["run_id"])] for r in rows],
        "silent_before_stop": [stopped[str(r["run_id"])] - r["last_heartbeat_at"].timestamp() for r in rows],
    }
    res["succeeded"] = await settle(store, ids, timeout=120, running=running)
    return res


async def raw_ceiling(env: BenchEnv, n: int) -> list[float]:
    """Plain aio-pika publish (confirm, persistent, quorum queue) -> consume -> one UPDATE -> ack."""
    conn = await aio_pika.connect(env.amqp_url)
    pg = await asyncpg.connect(env.db_url)
    try:
        await pg.execute("CREATE TABLE bench_rtt (id integer PRIMARY KEY, t timestamptz)")
        await pg.execute("INSERT INTO bench_rtt VALUES (1, now())")
        pub = await conn.channel(publisher_confirms=True)
        sub = await conn.channel()
        await sub.set_qos(prefetch_count=10)
        queue = await sub.declare_queue("bench.raw.rtt", durable=True, arguments={"x-queue-type": "quorum"})
        done: asyncio.Queue[float] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await pg.execute("UPDATE bench_rtt SET t = clock_timestamp() WHERE id = 1")
            await message.ack()
            done.put_nowait(time.perf_counter())

        await queue.consume(on_message)
        samples = []
        for i in range(n + 10):
            t0 = time.perf_counter()
            await pub.default_exchange.publish(
                aio_pika.Message(b'{"v": 1}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue.name
            )
            t1 = await asyncio.wait_for(done.get(), 10)
            if i >= 10:  # warm-up
                samples.append(t1 - t0)
        await queue.delete(if_unused=False, if_empty=False)
        return samples
    finally:
        await pg.close()
        await conn.close()


def line(name: str, xs: list[float], target: str, raw_p50: float) -> list[str]:
    return [
        name,
        str(len(xs)),
        ms(pct(xs, 50)),
        ms(pct(xs, 99)),
        ms(max(xs) if xs else float("nan")),
        target,
        ratio(pct(xs, 50), raw_p50),
    ]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 runs a phase, under ~40 s")
    parser.add_argument("-k", type=int, default=None, help="runs per phase (default 50; --quick 10)")
    parser.add_argument(
        "--spread", type=float, default=None, help="seconds the hang-spread SIGSTOPs span (default 5; --quick 3)"
    )
    parser.add_argument(
        "--no-workaround", action="store_true", help="do not work around the Decimal bug of the heartbeat sweep"
    )
    parser.add_argument(
        "--fork-server", action="store_true", help="the process launcher's fork server (run_launcher.config)"
    )
    parser.add_argument("--crash-only", action="store_true", help="only the crash phase")
    parser.add_argument("--raw-samples", type=int, default=None, help="raw ceiling round trips (default 200)")
    args = parser.parse_args()
    k = args.k or (10 if args.quick else 50)
    args.spread = args.spread if args.spread is not None else (3.0 if args.quick else 5.0)
    n_raw = args.raw_samples or (100 if args.quick else 200)
    quiet_logs()
    t_start = time.monotonic()
    print(f"# detect: K={k} runs a phase; {machine()}", flush=True)
    async with bench_env("detect") as env:
        cfg = make_config(env, args.fork_server)
        bug = await numeric_bug_present(env.db_url)
        if bug and not args.no_workaround:
            patch_numeric_codec()
            print(
                "WORKAROUND: silent_workers.silent_seconds is numeric (Decimal) and sweeper.py subtracts a "
                "float from it; decoding numeric as float in this process (see the report)",
                flush=True,
            )
        store = await Store.connect(env.db_url)
        broker = await Broker.connect(env.amqp_url)
        running = await app.start(cfg, {"launcher": 1, "heartbeat": 1, "monitor": 1})
        try:
            t = time.monotonic()
            crash = await crash_phase(env, running, store, broker, k)
            print(f"crash phase done in {time.monotonic() - t:.1f} s", flush=True)
            if args.crash_only:
                burst = spread = {"decision": [], "launched": [], "succeeded": 0, "stop_to_decision": []}
                burst["silent_before_stop"] = []
            else:
                t = time.monotonic()
                burst = await hang_phase(env, running, store, broker, k, spread=0.0)
                print(f"hang-burst phase done in {time.monotonic() - t:.1f} s", flush=True)
                t = time.monotonic()
                spread = await hang_phase(env, running, store, broker, k, spread=args.spread)
                print(f"hang-spread phase done in {time.monotonic() - t:.1f} s", flush=True)
        finally:
            await running.close()
            await broker.close()
            await store.close()
        raw = await raw_ceiling(env, n_raw)
        peak = rss()[1]
    elapsed = time.monotonic() - t_start
    raw_p50 = pct(raw, 50)

    print()
    print(
        f"Detection latency, process launcher, K={k} workers a phase, poll_interval 1 s, heartbeat "
        f"0.5 s / timeout 3 s ({os.cpu_count()} CPUs, services + workers on the same machine). "
        f"Ratio: p50 against the raw ceiling's p50."
    )
    print()
    rows = [
        line("crash (SIGKILL, burst of K): kill → WORKER_EXITED reported", crash["exit_reported"], "", raw_p50),
        line("crash: kill → resume decided", crash["decision"], "", raw_p50),
        line("crash: kill → attempt 2 claimed by the launcher", crash.get("claimed", []), "", raw_p50),
        line("crash: kill → attempt 2 worker process started (/proc)", crash.get("forked", []), "", raw_p50),
        line("crash: kill → attempt 2 launched (recorded)", crash["launched"], "", raw_p50),
        line("crash: kill → attempt 2 STARTED (its RUN_START)", crash["started"], "p99 < 1 s", raw_p50),
        line("hang (SIGSTOP, burst of K): deadline → resume decided", burst["decision"], "", raw_p50),
        line("hang (burst): deadline → attempt 2 launched", burst["launched"], "p99 < 1 s (one poll)", raw_p50),
        line(
            f"hang (SIGSTOP spread over {args.spread:g} s): deadline → resume decided", spread["decision"], "", raw_p50
        ),
        line("hang (spread): deadline → attempt 2 launched", spread["launched"], "p99 < 1 s (one poll)", raw_p50),
        [
            "raw ceiling: aio-pika publish→consume + 1 asyncpg UPDATE",
            str(len(raw)),
            ms(raw_p50),
            ms(pct(raw, 99)),
            ms(max(raw)),
            "",
            "1.00x",
        ],
    ]
    print(table(["path", "n", "p50", "p99", "max", "target", "p50 / raw"], rows))
    print()

    def verdict(samples: list[float], bound: float) -> str:
        if not samples:
            return "not run"  # a phase left out (--crash-only) is neither met nor missed
        return "MET" if pct(samples, 99) < bound else "MISSED"

    print(
        f"targets: crash p99 < 1 s: {verdict(crash['started'], 1.0)}; hang burst p99 < {POLL:g} s past "
        f"deadline: {verdict(burst['launched'], POLL)}; hang spread: {verdict(spread['launched'], POLL)}"
    )
    print(
        f"resumed runs that then succeeded: crash {crash['succeeded']}/{k}, hang-burst {burst['succeeded']}/{k}, "
        f"hang-spread {spread['succeeded']}/{k}"
    )
    print(
        f"hang (burst): SIGSTOP → decision p50 {ms(pct(burst['stop_to_decision'], 50))} (includes the "
        f"{HB_TIMEOUT:g} s timeout); last heartbeat before the stop p50 {ms(pct(burst['silent_before_stop'], 50))}"
    )
    kinds = dict(Counter(crash["orphans"]))
    print(
        f"attempt-1 processes still alive 1 s after the crash runs finished (orphaned steps): "
        f"{len(crash['orphans'])} {kinds}"
    )
    mem = crash["memory"]
    if mem:
        print(
            f"worker memory ({'forked from the fork server' if args.fork_server else 'exec'}, {len(mem)} live): "
            f"PSS p50 {pct([m[0] for m in mem], 50):.1f} MiB, USS p50 {pct([m[1] for m in mem], 50):.1f} MiB"
        )
    spares = crash.get("spare_memory") or []
    if spares:
        print(
            f"fork server spares (forked ahead, idle): {len(spares)}, PSS {sum(m[0] for m in spares):.1f} MiB "
            f"and USS {sum(m[1] for m in spares):.1f} MiB in all (USS p50 {pct([m[1] for m in spares], 50):.2f} MiB)"
        )
    print(f"peak RSS of the bench process (services in-process): {peak:.0f} MiB; total time {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
