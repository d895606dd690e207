"""The whole system at fleet scale: the services as separate processes against the sim launcher.

One launcher (run_launcher ``sim``: the virtual workers live in its process and speak the real worker
protocol over RabbitMQ), 2 heartbeat and 3 monitor replicas, each a ``runherd`` process of its own,
against a private database and vhost. Every run has two steps (``prepare`` takes ``--step-seconds``;
``work`` waits for a command, ``RUNHERD_SIM_OUTCOME=wait``), so a resumed attempt reuses ``prepare``.

Phases, each printing its figures:

1. Storm: every launch published at once; time until all are stored QUEUED and until all are
   STARTED, against the raw ceiling measured first in the same run (aio-pika publish with confirms to
   a quorum queue -> consume in batches -> one INSERT per batch -> ack).
2. Steady: a window with every run STARTED and heartbeating: CPU % and RSS of each process, heartbeat
   lag p50/p99 (the heartbeat replicas' canaries), sweep p50/p99 (the monitors' whole-sweep
   histogram, runherd_sweep_seconds: the deadline probe and every rule it ran). Measured twice, the heartbeat and
   monitor replicas on the default loop and then restarted on uvloop (``RUNHERD_EVENT_LOOP``).
3. Crash storm: 1 % of the runs crash at once (sim command): each resumed exactly once; p50/p99 from
   the command to the resume decided (attempts.created_at) and to the new attempt's RUN_START.
4. Hang storm: 1 % of the runs stop heartbeating: detected within heartbeat timeout + 1 s (the
   decision against the silent attempt's last heartbeat), each resumed exactly once.
5. Replica loss: one monitor replica SIGKILLed while 1 % of the runs crash: every crash resumed
   exactly once, no event lost (the events queue drains, nothing dead-lettered).
6. Drain: every run told to finish: 0 lost, 0 stuck; then every run's attempts counted against the
   faults it was dealt, and every attempt's workers (one RUN_START source each).

The last line is ``FLEET_RESULT <json>`` (tests/acceptance/test_fleet.py reads it).

    .venv/bin/python scripts/bench/fleet.py                 # 10,000 runs, 10 min steady
    .venv/bin/python scripts/bench/fleet.py --quick         # 10,000 runs, 2 min steady per loop
    .venv/bin/python scripts/bench/fleet.py --ci --runs 300 # correctness only, short phases
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import aio_pika  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402

from runherd.broker import Broker  # noqa: E402
from runherd.launchers import sim  # noqa: E402
from scripts.bench._benchlib import BenchEnv, bench_env, machine, ms, pct, quiet_logs, table  # noqa: E402

PY = str(Path(sys.executable))
TICKS = os.sysconf("SC_CLK_TCK")
STEPS = [{"key": "prepare", "command": ["true"]}, {"key": "work", "command": ["true"], "deps": ["prepare"]}]


@dataclass
class Settings:
    runs: int
    steady_seconds: float
    heartbeat_interval: float
    heartbeat_timeout: float
    poll: float
    step_seconds: float
    workers_per_connection: int
    fault_count: int
    compare_loops: bool
    ci: bool
    fleet_process: bool = True


def settings(args: argparse.Namespace) -> Settings:
    made = _settings(args)
    made.fleet_process = not args.fleet_in_thread
    if args.heartbeat_interval:
        made.heartbeat_interval = args.heartbeat_interval
    if args.heartbeat_timeout:
        made.heartbeat_timeout = args.heartbeat_timeout
    return made


def _settings(args: argparse.Namespace) -> Settings:
    if args.ci:
        # A 15 s heartbeat timeout: the CI machine runs the fault suite beside this on 2 cores, and a
        # fleet process starved for longer than a short timeout is rightly taken for hung.
        return Settings(
            args.runs, 3, 1.0, 15.0, 0.5, 0.2, args.workers_per_connection or 25, max(5, args.runs // 20), False, True
        )
    steady = args.steady or (120 if args.quick else 600)
    per_conn = args.workers_per_connection or (1 if args.runs <= 400 else 50)
    return Settings(
        args.runs, steady, 5.0, 30.0, 1.0, args.step_seconds, per_conn, max(1, args.runs // 100), True, False
    )


# --- the service processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    verb: str
    proc: subprocess.Popen[bytes]
    port: int
    loop: str
    pid: int = 0  # another process than ``proc`` (the launcher's sim fleet process), with no port

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.pid or self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss_mb(self) -> float:
        with contextlib.suppress(OSError), open(f"/proc/{self.pid or self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return math.nan

    def scrape(self) -> dict[str, float]:
        """The process's Prometheus samples, ``name{labels}`` -> value."""
        if not self.port:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[key] = float(value)
        return samples


@dataclass
class Fleet:
    env: BenchEnv
    s: Settings
    pool: asyncpg.Pool
    broker: Broker
    services: list[Service] = field(default_factory=list)
    attempt_of: dict[str, int] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def config_file(self, name: str, port: int) -> Path:
        raw = {
            "amqp_url": self.env.amqp_url,
            "database_url": self.env.db_url,
            "metrics_port": port,
            "log_level": os.environ.get("FLEET_LOG_LEVEL", "WARNING"),
            "run_monitoring": {
                "poll_interval_seconds": self.s.poll,
                "heartbeat_interval_seconds": self.s.heartbeat_interval,
                "heartbeat_timeout_seconds": self.s.heartbeat_timeout,
                "start_timeout_seconds": 600,
                "max_resume_run_attempts": 10,
            },
            "run_coordinator": {"dequeue_interval_seconds": 0.5},
            "run_launcher": {
                "name": "sim",
                "config": {
                    "step_seconds": self.s.step_seconds,
                    "workers_per_connection": self.s.workers_per_connection,
                    "terminate_grace_seconds": 2,
                    "fleet_process": self.s.fleet_process,
                },
            },
        }
        path = self.env.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def spawn(self, name: str, verb: str, loop: str = "asyncio") -> Service:
        port = free_port()
        log = open(self.env.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            [PY, "-m", "runherd.cli", "--config", str(self.config_file(name, port)), verb],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUNHERD_EVENT_LOOP": loop, "RUNHERD_BENCH_TAG": self.env.tag},
        )
        self.env.pids.add(proc.pid)
        service = Service(name, verb, proc, port, loop)
        self.services.append(service)
        return service

    async def ready(self, services: list[Service]) -> None:
        deadline = time.monotonic() + 60
        for service in services:
            while not await asyncio.to_thread(service.scrape):
                if service.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{service.name} did not come up (see {self.env.tmp}/{service.name}.log)")
                await asyncio.sleep(0.2)

    def stop(self, service: Service, sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            service.proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.proc.wait(timeout=20)
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait(timeout=10)
        self.services.remove(service)

    def fleet_processes(self) -> list[Service]:
        """The launcher's sim fleet process (``fleet_process: true``), a row of its own."""
        launchers = self.live("launcher")
        return [Service("sim fleet", "fleet", s.proc, 0, s.loop, pid=pid) for s in launchers for pid in children(s)]

    def live(self, verb: str) -> list[Service]:
        return [s for s in self.services if s.verb == verb and s.proc.poll() is None]

    async def check_alive(self) -> None:
        dead = [s.name for s in self.services if s.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"service process(es) exited: {', '.join(dead)} (logs in {self.env.tmp})")

    # --- database views ---------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT status, count(*) AS n FROM runs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    async def resumed(self, targets: dict[str, int]) -> dict[str, tuple[float, float | None]]:
        """For each run -> the attempt expected: (decided at, its RUN_START at or None)."""
        rows = await self.pool.fetch(
            "SELECT a.run_id::text AS run_id, a.attempt, extract(epoch FROM a.created_at)::float8 AS decided, "
            "(SELECT extract(epoch FROM min(e.ts))::float8 FROM events e WHERE e.run_id = a.run_id "
            " AND e.attempt = a.attempt AND e.type = 'RUN_START') AS started "
            "FROM attempts a WHERE a.run_id = ANY($1::uuid[]) AND a.attempt > 1",
            list(targets),
        )
        return {r["run_id"]: (r["decided"], r["started"]) for r in rows if r["attempt"] == targets[r["run_id"]]}

    async def command(self, action: str, run_ids: list[str] | None) -> float:
        await self.broker.publish(sim.CONTROL_EXCHANGE, "", sim.command_body(action, run_ids), persistent=False)
        return time.time()


def children(service: Service) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{service.proc.pid}/task"):
            with open(f"/proc/{service.proc.pid}/task/{task}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
    return pids


async def wait_until(what: str, check: Any, timeout: float, fleet: Fleet, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        await fleet.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


# --- the raw ceiling ----------------------------------------------------------------------------


async def raw_ceiling(env: BenchEnv, pool: asyncpg.Pool, n: int) -> float:
    """Runs/s of publish (persistent, confirmed) -> quorum queue -> consume 500 at a time -> one
    INSERT per batch -> ack, the messages published all at once as the storm's are."""
    await pool.execute("CREATE TABLE IF NOT EXISTS raw_ceiling (id uuid PRIMARY KEY, body jsonb)")
    connection = await aio_pika.connect(env.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("fleet.raw", durable=True, arguments={"x-queue-type": "quorum"})
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=1000)
        cqueue = await consumer.get_queue("fleet.raw")
        done = asyncio.Event()
        batch: list[aio_pika.abc.AbstractIncomingMessage] = []
        stored = 0
        lock = asyncio.Lock()

        async def flush() -> None:
            nonlocal stored, batch
            async with lock:
                taken, batch = batch, []
                if not taken:
                    return
                rows = [(uuid.UUID(orjson.loads(m.body)["run_id"]), m.body.decode()) for m in taken]
                await pool.execute(
                    "INSERT INTO raw_ceiling SELECT * FROM unnest($1::uuid[], $2::jsonb[]) ON CONFLICT DO NOTHING",
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                )
                await taken[-1].ack(multiple=True)
                stored += len(taken)
                if stored >= n:
                    done.set()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            batch.append(message)
            if len(batch) >= 500:
                await flush()

        async def ticker() -> None:
            while not done.is_set():
                await asyncio.sleep(0.05)
                await flush()

        await cqueue.consume(on_message)
        tick = asyncio.ensure_future(ticker())
        began = time.perf_counter()
        bodies = [orjson.dumps({"v": 1, "run_id": str(uuid.uuid4()), "job": "raw", "steps": STEPS}) for _ in range(n)]
        for start in range(0, n, 1000):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(b, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="fleet.raw"
                    )
                    for b in bodies[start : start + 1000]
                )
            )
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - began
        tick.cancel()
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return n / elapsed


# --- phases -------------------------------------------------------------------------------------


async def storm(fleet: Fleet, raw_rate: float) -> None:
    n = fleet.s.runs
    fleet.run_ids = [str(uuid.uuid4()) for _ in range(n)]
    bodies = [
        orjson.dumps({"v": 1, "run_id": r, "job": "fleet", "steps": STEPS, "env": {"RUNHERD_SIM_OUTCOME": "wait"}})
        for r in fleet.run_ids
    ]
    began = time.time()
    for start in range(0, n, 1000):
        await asyncio.gather(*(fleet.broker.publish_command("launch", b) for b in bodies[start : start + 1000]))
    published = time.time()
    stored_at = started_at = None
    deadline = time.monotonic() + 120  # pushed back while runs keep starting
    progress = -1
    while started_at is None:
        counts = await fleet.counts()
        now = time.time()
        if counts.get("STARTED", 0) > progress:
            progress, deadline = counts.get("STARTED", 0), time.monotonic() + 120
        if stored_at is None and sum(counts.values()) >= n:
            stored_at = now
        if counts.get("STARTED", 0) >= n:
            started_at = now
        await fleet.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"storm: no run started for 120 s: {counts}")
        await asyncio.sleep(0.1)
    assert stored_at is not None
    launched = await fleet.pool.fetchval("SELECT extract(epoch FROM max(launched_at))::float8 FROM attempts")
    first_event = await fleet.pool.fetchval(
        "SELECT extract(epoch FROM max(ts))::float8 FROM events WHERE type = 'RUN_START' AND attempt = 1"
    )
    fleet.attempt_of = dict.fromkeys(fleet.run_ids, 1)
    rate = n / (started_at - began)
    intake = n / (stored_at - began)
    fleet.result["storm"] = {
        "publish_s": published - began,
        "stored_s": stored_at - began,
        "stored_after_publish_s": stored_at - published,
        "started_s": started_at - began,
        "launched_s": launched - began,
        "run_start_sent_s": first_event - began,
        "runs_per_s": rate,
        "raw_per_s": raw_rate,
    }
    print(f"\n## Storm: {n:,} launches published at once\n")
    print(
        table(
            [
                "published in",
                "all stored QUEUED",
                "all launched",
                "last RUN_START sent",
                "all STARTED",
                "intake",
                "start rate",
                "raw ceiling",
                "vs raw",
            ],
            [
                [
                    f"{published - began:.1f} s",
                    f"{stored_at - began:.1f} s ({stored_at - published:+.1f} s after publishing)",
                    f"{launched - began:.1f} s",
                    f"{first_event - began:.1f} s",
                    f"{started_at - began:.1f} s",
                    f"{intake:,.0f}/s",
                    f"{rate:,.0f} runs/s",
                    f"{raw_rate:,.0f}/s",
                    f"intake {intake / raw_rate:.2f}x, start {rate / raw_rate:.2f}x",
                ]
            ],
        )
    )


def histogram_quantiles(
    before: dict[str, float], after: dict[str, float], name: str, match: str = ""
) -> tuple[dict[float, float], float]:
    """Bucket counts of ``name`` (samples whose labels contain ``match``) between two scrapes."""
    buckets: dict[float, float] = {}
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{") and match in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            bound = math.inf if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    return buckets, buckets.get(math.inf, 0.0)


def quantile(buckets: dict[float, float], total: float, q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in sorted(buckets):
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / max(count - below, 1e-9))
        lower, below = bound, count
    return lower


async def probe_heartbeats(fleet: Fleet, stop: asyncio.Event, lags: list[float]) -> None:
    """Heartbeat lag as a worker sees it: a heartbeat published (for a live run, as its worker's
    would be) until its attempt's last_heartbeat_at (the database's clock at the write) passes the
    send time; one probe every 0.25 s, each on another run."""
    from runherd import auth
    from runherd.contract import heartbeat_body

    # Signed as the attempt's worker signs it: an unsigned heartbeat is dropped as forged, and the
    # probe would measure the wait for the worker's own next heartbeat instead (half the interval).
    key = bytes(await fleet.pool.fetchval("SELECT key FROM runherd_keys WHERE name = 'events'"))
    rng = random.Random(7)
    while not stop.is_set():
        run_id = rng.choice(fleet.run_ids)
        attempt = fleet.attempt_of.get(run_id, 1)
        sent = time.time()
        token = auth.token(key, auth.WORKER, run_id, attempt)
        await fleet.broker.publish_heartbeat(heartbeat_body(run_id, attempt), token=token)
        deadline = sent + 10
        while time.time() < deadline:
            seen = await fleet.pool.fetchval(
                "SELECT extract(epoch FROM last_heartbeat_at)::float8 FROM attempts WHERE run_id = $1 AND attempt = $2",
                uuid.UUID(run_id),
                attempt,
            )
            if seen is not None and seen >= sent:
                lags.append(seen - sent)
                break
            await asyncio.sleep(0.01)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


Scrapes = dict[str, dict[str, float]]


def merged_histogram(
    services: list[Service], verb: str, before: Scrapes, after: Scrapes, name: str
) -> tuple[dict[float, float], float]:
    """One histogram's buckets and count over a window, summed over the replicas of ``verb``."""
    buckets: dict[float, float] = {}
    total = 0.0
    for s in services:
        if s.verb == verb:
            b, t = histogram_quantiles(before[s.name], after[s.name], name)
            for k, v in b.items():
                buckets[k] = buckets.get(k, 0.0) + v
            total += t
    return buckets, total


def loop_lags(
    services: list[Service], before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, float]:
    """p99 timer lag of each process's event loop, and of the sim fleet's own loop."""
    lags: dict[str, float] = {}
    for s in services:
        for loop_name in ("main", "sim-fleet"):
            b, t = histogram_quantiles(
                before[s.name], after[s.name], "runherd_event_loop_lag_seconds", f'loop="{loop_name}"'
            )
            if t:
                lags[s.name if loop_name == "main" else "sim fleet"] = quantile(b, t, 0.99)
    return lags


def full_collections(services: list[Service], before: Scrapes, after: Scrapes) -> dict[str, tuple[float, float]]:
    """Each process's full (generation 2) garbage collections in a window: how many, and how long
    each took on average (runherd_gc_pause_seconds: the whole process stops for one)."""
    out: dict[str, tuple[float, float]] = {}
    for s in services:
        for process in ("main", "sim-fleet"):

            def grown(series: str, name: str = s.name, process: str = process) -> float:
                # prometheus_client writes labels sorted by name
                sample = f'runherd_gc_pause_seconds_{series}{{generation="2",process="{process}"}}'
                return after[name].get(sample, 0.0) - before[name].get(sample, 0.0)

            n, total = grown("count"), grown("sum")
            if n:
                out[s.name if process == "main" else "sim fleet"] = (n, total / n)
    return out


async def autovacuum_stand_in(pool: asyncpg.Pool) -> None:
    """What autovacuum would have done after a storm of 10,000 inserts and 30,000 status changes
    (its default trigger is 20 % of a table's rows dead): this machine's PostgreSQL runs with
    ``autovacuum = off``, and without it every STARTED-run scan of the steady phase wades through
    the storm's dead tuples. Says so when it stands in."""
    if await pool.fetchval("SELECT current_setting('autovacuum')") == "off":
        began = time.monotonic()
        await pool.execute("VACUUM ANALYZE runs, attempts, events, steps, status_outbox")
        took = time.monotonic() - began
        print(f"\n(autovacuum is off on this server: the storm's tables vacuumed by hand, {took:.1f} s)")


async def steady_window(fleet: Fleet, seconds: float, label: str) -> dict[str, Any]:
    services = [*fleet.services, *fleet.fleet_processes()]
    probes: list[float] = []
    stop_probe = asyncio.Event()
    prober = asyncio.ensure_future(probe_heartbeats(fleet, stop_probe, probes))
    cpu0 = {s.name: s.cpu_seconds() for s in services}
    scrape0 = {s.name: await asyncio.to_thread(s.scrape) for s in services}
    rss: dict[str, float] = {s.name: s.rss_mb() for s in services}
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        await asyncio.sleep(min(5.0, seconds))
        await fleet.check_alive()
        for s in services:
            rss[s.name] = max(rss[s.name], s.rss_mb())
    elapsed = time.monotonic() - began
    cpu = {s.name: (s.cpu_seconds() - cpu0[s.name]) / elapsed * 100 for s in services}
    stop_probe.set()
    await prober
    scrape1 = {s.name: await asyncio.to_thread(s.scrape) for s in services}
    lag_buckets, lag_total = merged_histogram(services, "heartbeat", scrape0, scrape1, "runherd_heartbeat_lag_seconds")
    sb, sweeps = merged_histogram(services, "monitor", scrape0, scrape1, "runherd_sweep_seconds")
    sweep50, sweep99 = quantile(sb, sweeps, 0.5), quantile(sb, sweeps, 0.99)
    loop_lag = loop_lags(services, scrape0, scrape1)
    full_gc = full_collections(services, scrape0, scrape1)
    counts = await fleet.counts()
    window = {
        "label": label,
        "loop_lag_p99": loop_lag,
        "full_gc": full_gc,
        "seconds": elapsed,
        "cpu": cpu,
        "rss": rss,
        "lag_p50": pct(probes, 50),
        "lag_p99": pct(probes, 99),
        "lag_probes": len(probes),
        "watermark_p50": quantile(lag_buckets, lag_total, 0.5),
        "watermark_p99": quantile(lag_buckets, lag_total, 0.99),
        "sweep_p50": sweep50,
        "sweep_p99": sweep99,
        "sweeps": sweeps,
        "started": counts.get("STARTED", 0),
    }
    print(f"\n## Steady ({label}): {counts.get('STARTED', 0):,} runs STARTED, {elapsed:.0f} s window\n")
    print(
        table(
            ["process", "loop", "CPU % of a core", "RSS max"],
            [[s.name, s.loop, f"{cpu[s.name]:.1f} %", f"{rss[s.name]:.0f} MB"] for s in services],
        )
    )
    print(
        f"\nheartbeat lag (send -> written) p50 {ms(window['lag_p50'])}, p99 {ms(window['lag_p99'])} "
        f"({len(probes)} probes); heard-through watermark behind by p50 {ms(window['watermark_p50'])}, "
        f"p99 {ms(window['watermark_p99'])} (runherd_heartbeat_lag_seconds, heartbeat canaries every ~0.1 s); "
        f"sweep p50 {ms(sweep50)}, p99 {ms(sweep99)} (runherd_sweep_seconds, {sweeps:.0f} sweeps of 3 replicas)"
    )
    print(
        "event-loop timer lag p99 (runherd_event_loop_lag_seconds): "
        + ", ".join(f"{name} {ms(v)}" for name, v in loop_lag.items())
    )
    print(
        "full garbage collections (runherd_gc_pause_seconds, generation 2): "
        + (", ".join(f"{name} {n:.0f} x {ms(mean)}" for name, (n, mean) in full_gc.items()) or "none")
    )
    return window


async def steady(fleet: Fleet) -> None:
    windows = [await steady_window(fleet, fleet.s.steady_seconds, "asyncio")]
    if fleet.s.compare_loops:
        # The heartbeat and monitor replicas restarted on uvloop, one at a time (the fleet stays).
        for old in fleet.live("heartbeat") + fleet.live("monitor"):
            fleet.stop(old)
            new = fleet.spawn(old.name, old.verb, loop="uvloop")
            await fleet.ready([new])
        await asyncio.sleep(fleet.s.heartbeat_interval * 2)
        windows.append(await steady_window(fleet, fleet.s.steady_seconds, "uvloop"))
    fleet.result["steady"] = windows


async def resume_phase(fleet: Fleet, name: str, action: str, targets: list[str], kill_monitor: bool = False) -> None:
    expected = {r: fleet.attempt_of[r] + 1 for r in targets}
    last_beat: dict[str, float] = {}
    victim = fleet.live("monitor")[0] if kill_monitor else None
    if victim is not None:
        victim.proc.send_signal(signal.SIGKILL)
    t0 = await fleet.command(action, targets)
    if victim is not None:
        await asyncio.to_thread(victim.proc.wait, 10)
        fleet.services.remove(victim)
    timeout = (fleet.s.heartbeat_timeout if action == "hang" else 0) + 60 + len(targets) / 10

    async def all_started() -> dict[str, tuple[float, float | None]] | None:
        seen = await fleet.resumed(expected)
        return seen if len(seen) == len(targets) and all(v[1] is not None for v in seen.values()) else None

    seen = await wait_until(f"{name}: every run resumed", all_started, timeout, fleet)
    if action == "hang":
        olds = {r: fleet.attempt_of[r] for r in targets}
        rows = await fleet.pool.fetch(
            "SELECT a.run_id::text AS run_id, extract(epoch FROM a.last_heartbeat_at)::float8 AS beat FROM attempts a "
            "JOIN unnest($1::uuid[], $2::int[]) AS t(run_id, attempt) USING (run_id, attempt)",
            list(olds),
            list(olds.values()),
        )
        last_beat = {r["run_id"]: r["beat"] for r in rows if r["beat"] is not None}
    # Exactly once: wait a few sweeps more, then no run has gone past the attempt expected.
    await asyncio.sleep(fleet.s.poll * 3)
    rows = await fleet.pool.fetch(
        "SELECT run_id::text AS run_id, max(attempt) AS top FROM attempts "
        "WHERE run_id = ANY($1::uuid[]) GROUP BY run_id",
        targets,
    )
    twice = sum(1 for r in rows if r["top"] != expected[r["run_id"]])
    for r in targets:
        fleet.attempt_of[r] = expected[r]
    decided = [seen[r][0] - t0 for r in targets]
    started = [seen[r][1] - t0 for r in targets if seen[r][1] is not None]
    figures: dict[str, Any] = {
        "runs": len(targets),
        "resumed": len(seen),
        "resumed_twice": twice,
        "decided_p50": pct(decided, 50),
        "decided_p99": pct(decided, 99),
        "started_p50": pct(started, 50),
        "started_p99": pct(started, 99),
    }
    headers = ["runs", "resumed once", "resumed twice", "to decided p50 / p99", "to attempt running p50 / p99"]
    row = [
        len(targets),
        len(seen) - twice,
        twice,
        f"{ms(figures['decided_p50'])} / {ms(figures['decided_p99'])}",
        f"{ms(figures['started_p50'])} / {ms(figures['started_p99'])}",
    ]
    if action == "hang":
        late = [seen[r][0] - (last_beat[r] + fleet.s.heartbeat_timeout) for r in targets if r in last_beat]
        figures["late_p50"], figures["late_p99"], figures["late_max"] = pct(late, 50), pct(late, 99), max(late)
        figures["within_timeout_plus_1s"] = sum(1 for x in late if x <= 1.0)
        headers.append("decided after the heartbeat deadline p50 / p99 / max")
        row.append(f"{ms(figures['late_p50'])} / {ms(figures['late_p99'])} / {ms(figures['late_max'])}")
    if victim is not None:
        depths = await fleet.broker.queue_depths()
        figures["dead_letters"] = depths.get("runherd.dead-letters", 0)
        figures["killed"] = victim.name
        headers.append("dead letters")
        row.append(figures["dead_letters"])
    legs = await resume_legs(fleet, expected, t0, crashed=action == "crash")
    figures["legs"] = legs
    fleet.result[name] = figures
    title = {"crash": "Crash storm", "hang": "Hang storm", "replica_loss": "Replica loss"}[name]
    extra = f" ({victim.name} SIGKILLed at the same instant)" if victim is not None else ""
    print(f"\n## {title}: {len(targets)} runs {action} at once{extra}\n")
    print(table(headers, [row]))
    print(
        "\nleg by leg, p50 / p99 (the fleet's and the launcher's: the crash command to the WORKER_EXITED event; "
        "runherd's: that event to the decision, to the launcher's claim, to the handle recorded; the fleet's: the "
        "handle to the new worker's RUN_START): "
        + "; ".join(f"{leg} {ms(p50)} / {ms(p99)}" for leg, (p50, p99) in legs.items())
    )


LEGS_SQL = """
SELECT extract(epoch FROM x.exited)::float8 AS exited_at,
       extract(epoch FROM a.created_at - x.exited)::float8 AS exit_to_decided,
       extract(epoch FROM a.launch_claimed_at - a.created_at)::float8 AS decided_to_claimed,
       extract(epoch FROM a.launched_at - a.launch_claimed_at)::float8 AS claimed_to_launched,
       extract(epoch FROM s.started - a.launched_at)::float8 AS launched_to_run_start
FROM attempts a
JOIN unnest($1::uuid[], $2::int[]) AS t(run_id, attempt) USING (run_id, attempt)
LEFT JOIN LATERAL (SELECT min(ts) AS exited FROM events e WHERE e.run_id = a.run_id
                   AND e.attempt = a.attempt - 1 AND e.type = 'WORKER_EXITED') x ON true
LEFT JOIN LATERAL (SELECT min(ts) AS started FROM events e WHERE e.run_id = a.run_id
                   AND e.attempt = a.attempt AND e.type = 'RUN_START') s ON true
"""


async def resume_legs(
    fleet: Fleet, expected: dict[str, int], t0: float, crashed: bool
) -> dict[str, tuple[float, float]]:
    """Where a resume's time went: the fleet's and the launcher's report of a crash (the command at
    ``t0`` to the WORKER_EXITED event's time), runherd's legs (from that exit; none for a hang, which
    is decided by the deadline, its worker killed after) and the fleet's (the new virtual worker
    connecting and reporting)."""
    rows = await fleet.pool.fetch(LEGS_SQL, list(expected), list(expected.values()))
    legs: dict[str, tuple[float, float]] = {}
    reported = [r["exited_at"] - t0 for r in rows if r["exited_at"] is not None]
    if reported and crashed:
        legs["command to exit reported"] = (pct(reported, 50), pct(reported, 99))
    for leg in ("exit_to_decided", "decided_to_claimed", "claimed_to_launched", "launched_to_run_start"):
        values = [r[leg] for r in rows if r[leg] is not None and r[leg] >= 0]
        if values:
            legs[leg.replace("_", " ")] = (pct(values, 50), pct(values, 99))
    return legs


async def drain(fleet: Fleet) -> None:
    n = fleet.s.runs
    t0 = await fleet.command("succeed", None)

    async def finished() -> dict[str, int] | None:
        counts = await fleet.counts()
        return counts if counts.get("SUCCESS", 0) + counts.get("FAILURE", 0) + counts.get("CANCELED", 0) >= n else None

    counts = await wait_until("drain: every run finished", finished, 120 + n / 20, fleet)
    elapsed = time.time() - t0
    rows = await fleet.pool.fetch("SELECT run_id::text AS run_id, count(*) AS n FROM attempts GROUP BY run_id")
    attempts = {r["run_id"]: r["n"] for r in rows}
    wrong_attempts = sum(1 for r in fleet.run_ids if attempts.get(r) != fleet.attempt_of[r])
    doubles = await fleet.pool.fetchval(
        "SELECT count(*) FROM (SELECT run_id, attempt FROM events WHERE type = 'RUN_START' "
        "GROUP BY run_id, attempt HAVING count(DISTINCT source) > 1) d"
    )
    known = await fleet.pool.fetchval("SELECT count(*) FROM runs WHERE run_id = ANY($1::uuid[])", fleet.run_ids)
    depths = await fleet.broker.queue_depths()
    figures = {
        "seconds": elapsed,
        "success": counts.get("SUCCESS", 0),
        "lost": n - known,
        "stuck": n - sum(counts.get(s, 0) for s in ("SUCCESS", "FAILURE", "CANCELED")),
        "not_success": n - counts.get("SUCCESS", 0),
        "wrong_attempt_count": wrong_attempts,
        "attempts_with_two_workers": doubles,
        "dead_letters": depths.get("runherd.dead-letters", 0),
    }
    fleet.result["drain"] = figures
    print("\n## Drain: every run told to finish\n")
    print(
        table(
            [
                "SUCCESS",
                "lost",
                "stuck",
                "drain time",
                "runs with an unexpected attempt count",
                "attempts with 2 workers",
                "dead letters",
            ],
            [
                [
                    f"{figures['success']:,}",
                    figures["lost"],
                    figures["stuck"],
                    f"{elapsed:.1f} s ({n / elapsed:,.0f} runs/s)",
                    wrong_attempts,
                    doubles,
                    figures["dead_letters"],
                ]
            ],
        )
    )


def verdict(result: dict[str, Any]) -> list[str]:
    """Correctness only: what must hold whatever the machine's speed."""
    problems = []
    for phase in ("crash", "hang", "replica_loss"):
        figures = result.get(phase)
        if figures and (figures["resumed"] != figures["runs"] or figures["resumed_twice"]):
            problems.append(
                f"{phase}: {figures['resumed']}/{figures['runs']} resumed, {figures['resumed_twice']} twice"
            )
    drained = result.get("drain", {})
    for key in ("lost", "stuck", "not_success", "wrong_attempt_count", "attempts_with_two_workers", "dead_letters"):
        if drained.get(key, 1):
            problems.append(f"drain: {key} = {drained.get(key)}")
    return problems


async def run(args: argparse.Namespace) -> int:
    s = settings(args)
    quiet_logs()
    where = "in a process of its own" if s.fleet_process else "in a thread of the launcher"
    print(
        f"# fleet: {s.runs:,} runs, {s.workers_per_connection} virtual workers per connection, the fleet {where}"
        f"\n\n{machine()}"
    )
    async with bench_env("fleet") as env:
        pool = await asyncpg.create_pool(env.db_url, min_size=1, max_size=4)
        broker = await Broker.connect(env.amqp_url)
        await broker.declare_fanout(sim.CONTROL_EXCHANGE)
        fleet = Fleet(env, s, pool, broker)
        try:
            raw = await raw_ceiling(env, pool, s.runs)
            launcher = fleet.spawn("launcher", "launcher", loop=args.launcher_loop)
            others = [fleet.spawn(f"heartbeat-{i}", "heartbeat") for i in (1, 2)]
            others += [fleet.spawn(f"monitor-{i}", "monitor") for i in (1, 2, 3)]
            await fleet.ready([launcher, *others])
            await storm(fleet, raw)
            await autovacuum_stand_in(pool)
            await asyncio.sleep(s.heartbeat_interval)
            await steady(fleet)
            if args.until == "steady":
                return 0
            rng = random.Random(12)
            pool_ids = list(fleet.run_ids)
            rng.shuffle(pool_ids)
            k = s.fault_count
            await resume_phase(fleet, "crash", "crash", pool_ids[:k])
            await resume_phase(fleet, "hang", "hang", pool_ids[k : 2 * k])
            await resume_phase(fleet, "replica_loss", "crash", pool_ids[2 * k : 3 * k], kill_monitor=True)
            await drain(fleet)
        except BaseException:
            for path in sorted(env.tmp.glob("*.log")):
                lines = path.read_text(errors="replace").splitlines()
                print(f"\n--- {path.name} (last 25 of {len(lines)} lines)", *lines[-25:], sep="\n")
            raise
        finally:
            for service in list(fleet.services):
                fleet.stop(service)
            await broker.close()
            await pool.close()
    problems = verdict(fleet.result)
    print(
        "\n"
        + (
            "correct: 0 lost, 0 stuck, every fault resumed exactly once"
            if not problems
            else "PROBLEMS: " + "; ".join(problems)
        )
    )
    print("FLEET_RESULT " + orjson.dumps({**fleet.result, "problems": problems}).decode())
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="a 2-minute steady window per event loop")
    parser.add_argument("--steady", type=float, default=0, help="steady window, seconds (overrides --quick)")
    parser.add_argument("--ci", action="store_true", help="short phases, correctness only")
    parser.add_argument(
        "--until", choices=("drain", "steady"), default="drain", help="steady: stop after the steady windows"
    )
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--heartbeat-interval", type=float, default=0, help="default: 5 s (--ci: 1 s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=0, help="default: 30 s (--ci: 15 s)")
    parser.add_argument(
        "--fleet-in-thread", action="store_true", help="the fleet in a thread of the launcher (fleet_process: false)"
    )
    parser.add_argument("--launcher-loop", default="uvloop", help="the loop of the process hosting the fleet")
    parser.add_argument("--workers-per-connection", type=int, default=0, help="default: 1 up to 400 runs, else 50")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
