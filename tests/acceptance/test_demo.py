"""The demo cannot collide with a deployment (issue 13, item 9): it runs in a vhost and a database
of its own, made and removed by itself, however it ends; and it still shows, as it happens, the runs
submitted, a worker SIGKILLed and the monitor resuming it."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import signal
import subprocess
import sys
import time
from types import ModuleType

import asyncpg
import pytest

from tests import harness
from tests.harness import PYTHON, ROOT

pytestmark = pytest.mark.slow
DEMO = ROOT / "scripts" / "demo.py"
SANDBOX = re.compile(r"sandbox\s+vhost (runherd-demo-[0-9a-f]+) and database (runherd-demo-[0-9a-f]+)")


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runherd_demo_script", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def _exists(name: str) -> tuple[bool, bool]:
    """(vhost exists, database exists)."""
    vhosts = await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "-q", "list_vhosts", "name"], capture_output=True, text=True, timeout=60
    )
    conn = await asyncpg.connect(f"{harness.PG}/postgres")
    try:
        db = await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
    finally:
        await conn.close()
    return name in vhosts.stdout.split(), db == 1


def _stamp(line: str) -> float:
    return float(line[1:].split("s]", 1)[0])


async def test_the_demo_runs_in_its_own_vhost_and_database_and_removes_them() -> None:
    result = await asyncio.to_thread(
        subprocess.run, [PYTHON, str(DEMO)], capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    vhost, database = SANDBOX.search(out).groups()  # type: ignore[union-attr]
    assert vhost == database
    assert await _exists(vhost) == (False, False)
    assert f"removed   vhost {vhost} and database {database}" in out
    assert "Traceback" not in result.stderr, result.stderr
    # The story, in order and time-stamped as it happened.
    lines = [line for line in out.splitlines() if line.startswith("[")]
    order = ["submitted etl", "SIGKILL   etl worker", "monitor   worker crashed", "etl finished SUCCESS"]
    found = [next(i for i, line in enumerate(lines) if f"] {what}" in line) for what in order]
    assert found == sorted(found), lines
    stamps = [_stamp(line) for line in lines]
    assert stamps == sorted(stamps)
    assert any("STARTED -> SUCCESS   attempt 2" in line for line in lines), out


async def test_an_interrupted_demo_still_removes_its_sandbox() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(
            [PYTHON, str(DEMO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        try:
            assert proc.stdout is not None
            name = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                line = await asyncio.to_thread(proc.stdout.readline)
                match = SANDBOX.search(line)
                name = name or (match.group(1) if match else None)
                if "submitted" in line:
                    break
            assert name is not None
            assert await _exists(name) == (True, True)
            proc.send_signal(sig)
            out, err = await asyncio.to_thread(proc.communicate, timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert f"removed   vhost {name}" in out, (sig, out, err)
        assert await _exists(name) == (False, False), sig


async def test_setup_and_teardown_functions() -> None:
    demo = _demo_module()
    sandbox = await demo.create_sandbox(harness.AMQP, harness.PG)
    try:
        assert await _exists(sandbox.name) == (True, True)
        assert sandbox.amqp_url.endswith(f"/{sandbox.name}") and sandbox.database_url.endswith(f"/{sandbox.name}")
        # A connection left open (as a crashed demo would leave one) does not keep the database.
        leftover = await asyncpg.connect(sandbox.database_url)
    finally:
        await demo.remove_sandbox(sandbox, harness.AMQP, harness.PG)
    assert await _exists(sandbox.name) == (False, False)
    with pytest.raises((asyncpg.PostgresError, ConnectionError, asyncpg.InterfaceError)):
        await leftover.fetchval("SELECT 1")
