"""Test harness: a real PostgreSQL database and a real RabbitMQ vhost per test, services in-process,
and waiting on conditions (never on time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson

from runherd import app, auth, config
from runherd.broker import Broker
from runherd.store import Store, migrate

PG = os.environ.get("RUNHERD_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("RUNHERD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# Workers that misbehave on purpose (tests/fixtures): one that ignores SIGTERM, one that reports
# RUN_START and never heartbeats, one that comes up late.
STUBBORN = [PYTHON, str(ROOT / "tests" / "fixtures" / "stubborn_worker.py")]
SILENT = [PYTHON, str(ROOT / "tests" / "fixtures" / "silent_worker.py")]
LATE = [str(ROOT / "tests" / "fixtures" / "late_worker.sh"), PYTHON, "-m", "runherd.cli", "worker"]


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """`runherd ARGS...` as a subprocess from the checkout (``env`` on top of this process's):
    exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "runherd.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def eventually(
    predicate: Callable[[], Awaitable[Any]] | Callable[[], Any],
    timeout: float = 15,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


# --- databases ---------------------------------------------------------------------------------

_TEMPLATE = f"runherd_tpl_{os.getpid()}"


async def make_template() -> None:
    await migrate(f"{PG}/{_TEMPLATE}")


async def drop_template() -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{_TEMPLATE}" WITH (FORCE)')
    finally:
        await conn.close()


async def new_database() -> str:
    name = f"runherd_t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_TEMPLATE}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- vhosts ------------------------------------------------------------------------------------


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def new_vhost() -> str:
    name = f"runherd-t-{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(_ctl, "add_vhost", name)
    await asyncio.to_thread(_ctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


async def reset_vhost(amqp_url: str) -> bool:
    """Empty a vhost for the next test: runherd's queues and exchanges go, with their messages.
    Creating a vhost costs a second of rabbitmqctl; this costs milliseconds."""
    from runherd import broker as topology

    try:
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            for queue in (
                topology.COMMANDS_QUEUE,
                topology.EVENTS_QUEUE,
                topology.HEARTBEATS_QUEUE,
                topology.DEAD_QUEUE,
            ):
                await channel.queue_delete(queue)
            for shard in range(8):  # a sharded test's (event_shards <= 8)
                await channel.queue_delete(topology.shard_queue(shard))
            for exchange in (
                topology.COMMANDS,
                topology.EVENTS,
                topology.HEARTBEATS,
                topology.STATUS,
                topology.DEAD,
                topology.SHARDS_EXCHANGE,
                topology.UNSHARDED_EXCHANGE,
            ):
                await channel.exchange_delete(exchange)
        return True
    except Exception:
        return False


def delete_vhosts(names: list[str]) -> None:
    procs = [
        subprocess.Popen(["rabbitmqctl", "-q", "delete_vhost", n], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in names
    ]
    for p in procs:
        p.wait(timeout=60)


# --- the environment of one test ------------------------------------------------------------------


def fast_config(db_url: str, amqp_url: str, log_dir: Path, **overrides: Any) -> config.Config:
    """Second-scale timeouts, the process launcher writing logs under the test's tmp dir."""
    return config.from_mapping(fast_raw(db_url, amqp_url, log_dir, **overrides))


def fast_raw(db_url: str, amqp_url: str, log_dir: Path, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "amqp_url": amqp_url,
        "database_url": db_url,
        "run_monitoring": {
            "start_timeout_seconds": 10,
            "cancel_timeout_seconds": 10,
            "poll_interval_seconds": 0.5,
            "heartbeat_interval_seconds": 0.5,
            "heartbeat_timeout_seconds": 4,
            "max_resume_run_attempts": 3,
        },
        "run_coordinator": {"dequeue_interval_seconds": 0.5},
        "run_launcher": {"name": "process", "config": {"log_dir": str(log_dir), "terminate_grace_seconds": 3}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = _merge(raw[key], value)
        else:
            raw[key] = value
    return raw


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Env:
    db_url: str
    amqp_url: str
    tmp: Path
    store: Store
    broker: Broker
    cfg: config.Config
    running: list[app.Running] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def configure(self, **overrides: Any) -> config.Config:
        self.raw = fast_raw(self.db_url, self.amqp_url, self.tmp / "logs", **overrides)
        self.cfg = config.from_mapping(self.raw)
        return self.cfg

    def config_file(self) -> Path:
        """The current config as a runherd.yaml, for services run as subprocesses."""
        import yaml

        path = self.tmp / "runherd.yaml"
        path.write_text(yaml.safe_dump(self.raw_config()))
        return path

    def spawn(self, *verb: str) -> subprocess.Popen[bytes]:
        """A runherd service as a real process (so a test can SIGKILL it)."""
        log = open(self.tmp / f"{verb[0]}-{uuid.uuid4().hex[:6]}.log", "wb")
        proc = subprocess.Popen(
            [PYTHON, "-m", "runherd.cli", "--config", str(self.config_file()), *verb],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.processes.append(proc)
        return proc

    async def start(
        self, services: dict[str, int] | None = None, cfg: config.Config | None = None, **kwargs: Any
    ) -> app.Running:
        running = await app.start(cfg or self.cfg, services or {"launcher": 1, "heartbeat": 1, "monitor": 1}, **kwargs)
        self.running.append(running)
        return running

    async def stop_all(self) -> None:
        for proc in self.processes:
            proc.kill()
            proc.wait(timeout=10)
        while self.running:
            await self.running.pop().close(grace=2)
        # No worker outlives its test.
        # Only a group whose leader is still that worker (same start time): a pid reused by an
        # unrelated process on a busy machine must never be killed.
        from runherd.launchers.process import start_time

        for row in await self.store.fetch("SELECT handle FROM attempts WHERE handle ? 'pid'"):
            pid, started = row["handle"]["pid"], row["handle"].get("start_time")
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, 9)

    async def submit(
        self,
        steps: list[dict[str, Any]],
        *,
        job: str = "test-job",
        tags: dict[str, Any] | None = None,
        run_id: str | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        run_id = run_id or str(uuid.uuid4())
        body = {"v": 1, "run_id": run_id, "job": job, "steps": steps, "tags": tags or {}, "env": env or {}}
        await self.broker.publish_command("launch", orjson.dumps(body))
        return run_id

    async def run(self, run_id: str) -> dict[str, Any] | None:
        return await self.store.get_run(run_id)

    async def status(self, run_id: str) -> str | None:
        run = await self.store.get_run(run_id)
        return None if run is None else run["status"]

    async def wait_status(self, run_id: str, *statuses: str, timeout: float = 20) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            run = await self.store.get_run(run_id)
            return run if run is not None and run["status"] in statuses else None

        return await eventually(check, timeout, what=f"run {run_id} in {statuses}")

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        return await self.store.list_events(run_id)

    async def handle(self, run_id: str, attempt: int | None = None, timeout: float = 15) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            rows = await self.store.fetch(
                "SELECT attempt, handle FROM attempts WHERE run_id = $1 AND handle IS NOT NULL ORDER BY attempt DESC",
                uuid.UUID(run_id),
            )
            for row in rows:
                if attempt is None or row["attempt"] == attempt:
                    return row["handle"]
            return None

        return await eventually(check, timeout, what=f"worker handle of {run_id} attempt {attempt}")

    def process_launcher(self, command: list[str] | None = None, grace: float = 3) -> dict[str, Any]:
        """The ``run_launcher`` section for the process launcher: logs under the test's tmp dir, and
        optionally another worker command and terminate grace."""
        launcher_config: dict[str, Any] = {"log_dir": str(self.tmp / "logs"), "terminate_grace_seconds": grace}
        if command:
            launcher_config["worker_command"] = command
        return {"name": "process", "config": launcher_config}

    async def token(self, run_id: str, attempt: int, role: str = auth.WORKER) -> str:
        """The token that proves an event or heartbeat of ``role`` for this attempt (runherd.auth),
        for a test playing a worker or the launcher."""
        keys = await self.store.event_keys()
        return auth.token(keys.current, role, run_id, attempt)

    async def cancel(self, run_id: str) -> None:
        await self.broker.publish_command("terminate", orjson.dumps({"v": 1, "run_id": run_id}))

    def raw_config(self) -> dict[str, Any]:
        return dict(getattr(self, "raw", None) or fast_raw(self.db_url, self.amqp_url, self.tmp / "logs"))


class StatusLog:
    """Collects every status message published on runherd.status (plain aio-pika)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.message_ids: list[str | None] = []
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self, amqp_url: str, binding: str = "#") -> StatusLog:
        self._conn = await aio_pika.connect_robust(amqp_url)
        channel = await self._conn.channel()
        exchange = await channel.declare_exchange("runherd.status", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=binding)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                body = orjson.loads(message.body)
                body["_routing_key"] = message.routing_key
                self.messages.append(body)
                self.message_ids.append(message.message_id)

        await queue.consume(on_message)
        return self

    def of(self, run_id: str) -> list[str]:
        return [m["status"] for m in self.messages if m["run_id"] == run_id]

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


@contextlib.asynccontextmanager
async def status_log(amqp_url: str, binding: str = "#") -> AsyncIterator[StatusLog]:
    log = await StatusLog().start(amqp_url, binding)
    try:
        yield log
    finally:
        await log.close()


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found
