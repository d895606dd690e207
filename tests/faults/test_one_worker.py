"""The launcher SIGKILLed while launches are in flight, four times during a load of 100 runs, each
time restarted at once: some attempts have a worker started and no handle recorded. Issue 8,
item 4: no attempt ever gets a second worker, and the events of one attempt come from one worker.

The claim's lease (60 s) is shortened to 3 s in the launcher, so that the attempts the killed
launcher left behind are claimed again within the scenario, while their runs are still going: the
new launcher must adopt the live worker (its record, ``<log_dir>/<run_id>/attempt-<n>.worker``, is
locked by it), report the exit of one that already ran, and start a process only for an attempt
that has no record.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faults.invariants import Report, connect
from tests.faults.scenario import Scenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

KILLS = 4
LEASE_SECONDS = 3
PENDING = (
    "SELECT run_id::text, attempt FROM attempts "
    "WHERE handle IS NULL AND exited_at IS NULL AND launch_claimed_at IS NOT NULL"
)


def _record(scenario: Scenario, run_id: str, attempt: int) -> dict[str, Any] | None:
    path = scenario.tmp / "logs" / run_id / f"attempt-{attempt}.worker"
    try:
        record = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _has_worker(scenario: Scenario, run_id: str, attempt: int) -> bool:
    """The attempt's record names a worker, or is locked: a worker holds it (and will fill it in).
    Probed only while no launcher runs, whose own lock would look the same."""
    if (_record(scenario, run_id, attempt) or {}).get("pid"):
        return True
    try:
        fd = os.open(scenario.tmp / "logs" / run_id / f"attempt-{attempt}.worker", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


async def _kill_mid_launch(scenario: Scenario, timeout: float = 20, settle: float = 0.3) -> tuple[int, int]:
    """SIGKILL the launcher while it launches: once it has claimed attempts and not recorded their
    handles, and a worker record is filled in (or ``settle`` seconds later). The attempts it left
    claimed without a handle, and how many of them have a live or finished worker."""
    conn = await connect(scenario.db_url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (pending := await conn.fetch(PENDING)) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        settled = loop.time() + settle
        while pending and loop.time() < settled:
            if any((_record(scenario, r["run_id"], r["attempt"]) or {}).get("pid") for r in pending):
                break
            await asyncio.sleep(0.005)
            pending = await conn.fetch(PENDING)
        await scenario.kill("launcher")
        left = await conn.fetch(PENDING)
    finally:
        await conn.close()
    started = sum(1 for r in left if _has_worker(scenario, r["run_id"], r["attempt"]))
    await scenario.restart("launcher")
    return len(left), started


def _launcher_logs(tmp: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp.glob("launcher-*.log")))


async def _one_worker_each(scenario: Scenario, report: Report) -> None:
    """Each attempt's record, handle and event sources name one worker (``worker:<id>``; the
    transitions runherd logs for a worker's events say ``worker``, no id)."""
    attempts = await scenario.query("SELECT run_id::text, attempt, handle FROM attempts") or []
    logged = await scenario.query(
        "SELECT DISTINCT run_id::text, attempt, source FROM events WHERE source LIKE 'worker:%'"
    )
    sources: dict[tuple[str, int], set[str]] = defaultdict(set)
    for row in logged or []:
        sources[(row["run_id"], row["attempt"])].add(row["source"])
    for rec in scenario.recorder.events:  # every event published, also those the log deduplicated
        source = str(rec.body.get("source", ""))
        if source.startswith("worker:"):
            sources[(str(rec.body.get("run_id")), rec.body.get("attempt"))].add(source)
    records = 0
    for a in attempts:
        key = (a["run_id"], a["attempt"])
        record = _record(scenario, *key)
        handle = a["handle"] or {}
        if record is None:
            if sources.get(key):
                report.note("two_workers", f"{key[0]} attempt {key[1]}: events from {sources[key]}, no worker record")
            continue
        records += 1
        expected = f"worker:{record.get('worker_id')}"
        if sources.get(key, {expected}) != {expected}:
            report.note("two_workers", f"{key[0]} attempt {key[1]}: record {expected}, events from {sources[key]}")
        if handle and (handle.get("pid"), handle.get("worker_id")) != (record.get("pid"), record.get("worker_id")):
            report.note(
                "two_workers",
                f"{key[0]} attempt {key[1]}: handle pid {handle.get('pid')} {handle.get('worker_id')}, "
                f"record pid {record.get('pid')} {record.get('worker_id')}",
            )
    launcher_logs = _launcher_logs(scenario.tmp)
    report.notes.append(
        f"one worker per attempt: {len(attempts)} attempts, {records} worker records, "
        f"{sum(1 for s in sources.values() if len(s) > 1)} attempts with events of two workers; "
        f"re-claims that adopted a live worker {launcher_logs.count('adopting the live worker')}, "
        f"that reported the exit of one that already ran {launcher_logs.count('already ran')}"
    )


async def test_launcher_killed_mid_launch_never_makes_a_second_worker(scenario: Scenario) -> None:
    scenario.preludes["launcher"] = (
        f"import runherd.launcher.launching as launching\nlaunching.LAUNCH_LEASE_SECONDS = {LEASE_SECONDS}"
    )
    await scenario.start_services()
    assert scenario.broker is not None
    specs = scenario.load.specs
    wave = len(specs) // KILLS
    kills = []
    orphans = 0
    for turn in range(KILLS):
        await scenario.load.publish(
            scenario.broker, specs[turn * wave : (turn + 1) * wave if turn < KILLS - 1 else None]
        )
        left, started = await _kill_mid_launch(scenario)
        orphans += started
        kills.append(f"{left} claimed without handle ({started} with a worker started)")
    fault = (
        f"launcher SIGKILLed {KILLS} times mid-launch (one wave of {wave} launches each), each restarted, "
        f"claim lease {LEASE_SECONDS} s: " + "; ".join(kills)
    )
    report = await scenario.verdict(fault, extra=lambda r: _one_worker_each(scenario, r))
    assert report.violations() == {}
    assert orphans, "no kill caught a worker started and not recorded: the fault was not injected"
