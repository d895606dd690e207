"""The runherd demo: services on the local process launcher, runs submitted, a worker SIGKILLed
in the middle of a step, and the monitor resuming it from its last completed step.

    bash scripts/demo.sh          (installs everything first)
    .venv/bin/python scripts/demo.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runherd import app, client, config  # noqa: E402
from runherd.broker import STATUS, Broker  # noqa: E402
from runherd.runtime import setup_logging  # noqa: E402
from runherd.store import Store, migrate  # noqa: E402

DB = os.environ.get("RUNHERD_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/runherd_demo")
AMQP = os.environ.get("RUNHERD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
T0 = time.monotonic()


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
    work = Path(tempfile.mkdtemp(prefix="runherd-demo-"))
    effects = work / "extract-ran"
    cfg = config.from_mapping(
        {
            "amqp_url": AMQP,
            "database_url": DB,
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
    say(f"migrating {DB.rsplit('@', 1)[-1]}")
    await migrate(DB)
    running = await app.start(cfg, {"launcher": 1, "heartbeat": 1, "monitor": 2})
    say("runherd is up: 1 launcher, 1 heartbeat, 2 monitor replicas, process launcher")
    store = await Store.connect(DB)
    broker = await Broker.connect(AMQP)
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
            print(f"  a{e['attempt']} {e['source']:<8} {e['type']:<17} {step}{msg}", flush=True)
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
        await broker.close()
        await store.close()
        await running.close(grace=3)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
