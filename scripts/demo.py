"""The runherd demo: services on the local process launcher, runs submitted, a worker SIGKILLed
in the middle of a step, and the monitor resuming it from its last completed step.

    bash scripts/demo.sh          (installs everything first)
    .venv/bin/python scripts/demo.py

The demo never touches a deployment of yours: it makes its own RabbitMQ vhost and PostgreSQL
database (``runherd-demo-<random>``), and removes both when it ends, however it ends. It needs
the servers' addresses only: $RUNHERD_DEMO_AMQP (default amqp://guest:guest@127.0.0.1:5672) and
$RUNHERD_DEMO_PG (default postgresql://postgres@127.0.0.1:5432); the vhost is made with
`rabbitmqctl`, or the management HTTP API (port 15672) when rabbitmqctl is not on this host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runherd import app, client, config  # noqa: E402
from runherd.broker import STATUS, Broker  # noqa: E402
from runherd.runtime import setup_logging  # noqa: E402
from runherd.store import Store, migrate  # noqa: E402

PG_SERVER = os.environ.get("RUNHERD_DEMO_PG", "postgresql://postgres@127.0.0.1:5432").rstrip("/")
AMQP_SERVER = os.environ.get("RUNHERD_DEMO_AMQP", "amqp://guest:guest@127.0.0.1:5672").rstrip("/")
T0 = time.monotonic()


@dataclass(frozen=True)
class Sandbox:
    """The demo's own vhost and database: the same random name for both."""

    name: str
    amqp_url: str
    database_url: str


def _amqp_user(server: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(server)
    return parts.username or "guest", parts.password or "guest"


def _vhost(action: str, name: str, server: str) -> None:
    """Add (with permissions for the demo's user) or delete a vhost: rabbitmqctl if this host has it,
    else the management HTTP API."""
    user, password = _amqp_user(server)
    if shutil.which("rabbitmqctl"):
        commands = [["add_vhost", name], ["set_permissions", "-p", name, user, ".*", ".*", ".*"]]
        for args in commands if action == "add" else [["delete_vhost", name]]:
            subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)
        return
    host = urllib.parse.urlsplit(server).hostname or "127.0.0.1"
    api = f"http://{host}:15672/api"
    quoted = urllib.parse.quote(name, safe="")
    calls = [("PUT", f"{api}/vhosts/{quoted}", b""), ("PUT", f"{api}/permissions/{quoted}/{user}", _PERMS)]
    for method, url, body in calls if action == "add" else [("DELETE", f"{api}/vhosts/{quoted}", b"")]:
        request = urllib.request.Request(url, data=body or None, method=method)
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        request.add_header("content-type", "application/json")
        urllib.request.urlopen(request, timeout=30).close()


_PERMS = orjson.dumps({"configure": ".*", "write": ".*", "read": ".*"})


async def create_sandbox(amqp_server: str = AMQP_SERVER, pg_server: str = PG_SERVER) -> Sandbox:
    """A fresh vhost and a fresh, migrated database, both named runherd-demo-<random>."""
    name = f"runherd-demo-{uuid.uuid4().hex[:10]}"
    sandbox = Sandbox(name, f"{amqp_server}/{urllib.parse.quote(name, safe='')}", f"{pg_server}/{name}")
    await asyncio.to_thread(_vhost, "add", name, amqp_server)
    try:
        admin = await asyncpg.connect(f"{pg_server}/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')  # fails, rather than reuse, if it exists
        finally:
            await admin.close()
        await migrate(sandbox.database_url)
    except BaseException:
        await remove_sandbox(sandbox, amqp_server, pg_server)
        raise
    return sandbox


async def remove_sandbox(sandbox: Sandbox, amqp_server: str = AMQP_SERVER, pg_server: str = PG_SERVER) -> None:
    """Drop the demo's database (closing any connection left) and delete its vhost."""
    admin = await asyncpg.connect(f"{pg_server}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{sandbox.name}" WITH (FORCE)')
    finally:
        await admin.close()
    await asyncio.to_thread(_vhost, "delete", sandbox.name, amqp_server)


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {text}", flush=True)


async def print_statuses(broker: Broker, names: dict[str, str]) -> None:
    async for delivery in broker.subscribe(STATUS, "#"):
        body = orjson.loads(delivery.body)
        if body["run_id"] in names:
            reason = f"  ({body['reason']})" if body.get("reason") else ""
            say(
                f"status  {names[body['run_id']]:<8} {body['previous_status'] or '-':>9} -> {body['status']:<9}"
                f" attempt {body['attempt']}{reason}"
            )


async def wait_for(store: Store, run_id: str, predicate, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await store.list_events(run_id)
        found = [e for e in events if predicate(e)]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise TimeoutError(f"demo: gave up waiting on run {run_id}")


async def main() -> int:
    setup_logging("WARNING")
    # SIGTERM ends the demo like Ctrl-C does: through the finally below, which removes the sandbox.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    sandbox = await create_sandbox()
    say(f"sandbox   vhost {sandbox.name} and database {sandbox.name} (removed when the demo ends)")
    try:
        return await demo(sandbox.amqp_url, sandbox.database_url)
    finally:
        await remove_sandbox(sandbox)
        say(f"removed   vhost {sandbox.name} and database {sandbox.name}")


async def demo(amqp_url: str, db_url: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="runherd-demo-"))
    effects = work / "extract-ran"
    cfg = config.from_mapping(
        {
            "amqp_url": amqp_url,
            "database_url": db_url,
            "run_monitoring": {
                "poll_interval_seconds": 1,
                "heartbeat_interval_seconds": 1,
                "heartbeat_timeout_seconds": 6,
                "max_resume_run_attempts": 3,
            },
            "run_coordinator": {"max_concurrent_runs": 10},
            "run_launcher": {"name": "process", "config": {"log_dir": str(work / "logs")}},
        }
    )
    running = await app.start(cfg, {"launcher": 1, "heartbeat": 1, "monitor": 2})
    say("runherd is up: 1 launcher, 1 heartbeat, 2 monitor replicas, process launcher")
    store = await Store.connect(db_url)
    broker = await Broker.connect(amqp_url)
    names: dict[str, str] = {}
    printer = asyncio.ensure_future(print_statuses(broker, names))
    await asyncio.sleep(0.3)  # let the status subscription bind before the first publish
    try:
        etl = {
            "job": "nightly.etl",
            "tags": {"team": "data"},
            "steps": [
                {"key": "extract", "command": ["sh", "-c", f"echo extracted >> {effects}; echo extract done"]},
                {
                    "key": "transform",
                    "deps": ["extract"],
                    "command": [
                        "sh",
                        "-c",
                        'echo "transform, attempt $RUNHERD_ATTEMPT"; '
                        'if [ "$RUNHERD_ATTEMPT" = 1 ]; then sleep 600; else sleep 1; fi',
                    ],
                },
                {"key": "load", "deps": ["transform"], "call": "examples.steps:count_words"},
            ],
        }
        hello = {"job": "hello", "steps": [{"key": "greet", "command": ["echo", "hello"]}]}
        broken = {
            "job": "broken",
            "steps": [
                {"key": "fails", "command": ["sh", "-c", "echo 'no such table' >&2; exit 3"]},
                {"key": "never", "deps": ["fails"], "command": ["echo", "unreachable"]},
            ],
        }
        for name, launch in (("etl", etl), ("hello", hello), ("broken", broken)):
            run_id = await client.submit(broker, launch)
            names[run_id] = name
            say(f"submitted {name:<8} {run_id}")
        etl_id = next(r for r, n in names.items() if n == "etl")
        await wait_for(store, etl_id, lambda e: e["type"] == "STEP_START" and e["step_key"] == "transform")
        handle = (await store.get_run(etl_id))["handle"]
        say(f"SIGKILL   etl worker pid {handle['pid']} in the middle of step 'transform' (attempt 1)")
        os.kill(handle["pid"], signal.SIGKILL)
        resumed = await wait_for(store, etl_id, lambda e: e["type"] == "RUN_RESUMED")
        say(f"monitor   {resumed['message']}")
        final = await client.wait_for_terminal(store, etl_id, timeout=60)
        for run_id in names:
            await client.wait_for_terminal(store, run_id, timeout=60)
        await asyncio.sleep(0.3)  # the last status messages are on their way to the printer
        say(f"etl finished {final.value}; step 'extract' ran {len(effects.read_text().split())} time(s)")
        print("\nevent log of the etl run (runherd events RUN_ID):", flush=True)
        for e in await store.list_events(etl_id):
            step = f"[{e['step_key']}] " if e["step_key"] else ""
            msg = e["message"] or (
                f"{e['data'].get('from') or '-'} -> {e['data'].get('to')}" if e["type"] == "RUN_STATUS" else ""
            )
            print(f"  a{e['attempt']} {e['source']:<19} {e['type']:<17} {step}{msg}", flush=True)
        run = await store.get_run(etl_id)
        print(
            "\nsteps: "
            + ", ".join(
                f"{s['step_key']}={s['status']} (attempt {s['attempt']})"
                for s in sorted(run["steps_status"], key=lambda s: s["started_at"] or 0)
            )
        )
        return 0 if final.value == "SUCCESS" else 1
    finally:
        printer.cancel()
        # The subscription ends with the cancel; how aio-pika reports that is of no interest here.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await printer
        await broker.close()
        await store.close()
        await running.close(grace=3)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(130)
