"""Helpers shared by the benchmarks in scripts/bench: a private database and RabbitMQ vhost per run,
percentiles, the markdown table, RSS, and cleanup of the processes a benchmark started.

Each benchmark script fixes sys.path itself (see ``bootstrap``'s docstring) and then imports this
module as ``scripts.bench._benchlib``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
PG = os.environ.get("RUNHERD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("RUNHERD_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672")

log = logging.getLogger("runherd.bench")


# --- statistics --------------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear interpolation between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def ratio(a: float, b: float) -> str:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def rate(n: float) -> str:
    return f"{n:,.0f}/s"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def rss() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    cur = peak = math.nan
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


# --- the private environment of one benchmark ----------------------------------------------------------


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class BenchEnv:
    name: str
    db_name: str
    vhost: str
    tmp: Path
    tag: str  # RUNHERD_BENCH_TAG: set in every worker's env, so cleanup finds our processes only
    pids: set[int] = field(default_factory=set)

    @property
    def db_url(self) -> str:
        return f"{PG}/{self.db_name}"

    @property
    def amqp_url(self) -> str:
        return f"{AMQP}/{self.vhost}"


@contextlib.asynccontextmanager
async def bench_env(name: str) -> AsyncIterator[BenchEnv]:
    """A database ``runherd_bench_<name>_<hex>`` migrated with runherd.store.migrate, a vhost
    ``runherd-bench-<name>-<hex>`` and a temp dir; all removed on the way out, whatever happens."""
    from runherd.store import migrate

    suffix = uuid.uuid4().hex[:8]
    env = BenchEnv(
        name=name,
        db_name=f"runherd_bench_{name}_{suffix}",
        vhost=f"runherd-bench-{name}-{suffix}",
        tmp=Path(f"/tmp/runherd-bench-{name}-{suffix}"),
        tag=f"{name}-{suffix}",
    )
    env.tmp.mkdir(parents=True)
    vhost_made = False
    try:
        await migrate(env.db_url)
        await asyncio.to_thread(_ctl, "add_vhost", env.vhost)
        vhost_made = True
        await asyncio.to_thread(_ctl, "set_permissions", "-p", env.vhost, "guest", ".*", ".*", ".*")
        yield env
    finally:
        kill_tagged(env)
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(f"{PG}/postgres")
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{env.db_name}" WITH (FORCE)')
            finally:
                await conn.close()
        if vhost_made:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(_ctl, "delete_vhost", env.vhost)
        shutil.rmtree(env.tmp, ignore_errors=True)


async def insert_started_runs(store: Any, count: int, job: str, steps: int = 1) -> list[str]:
    """``count`` runs STARTED on attempt 1 with a worker handle, inserted in bulk (the same columns
    the services write), for benchmarks of what happens to runs in flight."""
    import orjson

    ids = [str(uuid.uuid4()) for _ in range(count)]
    plan = orjson.dumps([{"key": f"s{i}", "command": ["true"], "deps": []} for i in range(steps)]).decode()
    for start in range(0, count, 5000):
        chunk = [uuid.UUID(i) for i in ids[start : start + 5000]]
        await store.pool.execute(
            "INSERT INTO runs (run_id, job, status, attempt, priority, tags, steps, root_run_id, started_at, "
            "status_changed_at) SELECT u, $3, 'STARTED', 1, 0, '{}'::jsonb, $2::jsonb, u, now(), now() "
            "FROM unnest($1::uuid[]) AS u",
            chunk,
            plan,
            job,
        )
        await store.pool.execute(
            "INSERT INTO attempts (run_id, attempt, launcher, handle, launched_at) "
            "SELECT u, 1, 'process', jsonb_build_object('launcher', 'process', 'pid', 0), now() "
            "FROM unnest($1::uuid[]) AS u",
            chunk,
        )
    await store.pool.execute("VACUUM ANALYZE runs")
    await store.pool.execute("VACUUM ANALYZE attempts")
    return ids


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries RUNHERD_BENCH_TAG=<tag> (workers and their steps)."""
    needle = f"RUNHERD_BENCH_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def kill_tagged(env: BenchEnv) -> int:
    """SIGCONT then SIGKILL every process this benchmark started (by recorded pid or env tag)."""
    pids = set(tagged_pids(env.tag)) | {p for p in env.pids if proc_state(p) not in (None, "Z")}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05, running: Any = None) -> Any:
    """Poll an async predicate until truthy; RuntimeError after ``timeout`` seconds, or at once if the
    in-process services (``running``, a runherd.app.Running) have stopped because a task crashed."""
    deadline = time.monotonic() + timeout
    while True:
        if running is not None and running.supervisor.stop.is_set():
            raise RuntimeError(
                f"runherd's in-process services stopped while waiting for {what}: {running.supervisor.failure!r}"
            )
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


def quiet_logs(level: str = "WARNING") -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for name in ("aio_pika", "aiormq", "asyncio"):
        logging.getLogger(name).setLevel(logging.ERROR)


async def numeric_bug_present(db_url: str) -> bool:
    """True if queries.sql `silent_workers` returns silent_seconds as PostgreSQL numeric (a Python
    Decimal), which services/monitor/sweeper.py then subtracts a float from (TypeError)."""
    from runherd.store.queries import q

    conn = await asyncpg.connect(db_url)
    try:
        stmt = await conn.prepare(q("silent_workers"))
        types = {a.name: a.type.name for a in stmt.get_attributes()}
    finally:
        await conn.close()
    return types.get("silent_seconds") == "numeric"


def patch_numeric_codec() -> None:
    """Bench-side workaround for that bug, in this process only: the store's pools decode numeric as
    float, so the monitor's sweep does not crash (and stop every service) the first time a worker goes
    silent, and hang detection can be measured. runherd's schema has no numeric column."""
    from runherd.store import store as store_module

    original = store_module._init
    if getattr(original, "_bench_patched", False):
        return

    async def init(conn: asyncpg.Connection) -> None:
        await original(conn)
        await conn.set_type_codec("numeric", encoder=str, decoder=float, schema="pg_catalog", format="text")

    init._bench_patched = True  # type: ignore[attr-defined]
    store_module._init = init
