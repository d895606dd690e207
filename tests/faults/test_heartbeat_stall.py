"""A heartbeat outage is not a fleet of hung workers (issue 8, item 2): the heartbeat service is
SIGSTOPped for twice `heartbeat_timeout_seconds` during a load of 100 runs (a fifth of them
finished, up to 30 in flight, at least two of them runs longer than the timeout), then SIGCONTed. No
worker of the load hangs or crashes, so every resume would be spurious: there must be none. The
monitor has to tell "this worker is silent" from "I cannot hear anyone".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from tests import harness
from tests.faults.scenario import LIMITS, Scenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

LONG_LIVE = 2  # the stall starts when this many runs longer than the timeout are under way


async def _long_runs_live(scenario: Scenario) -> int:
    rows = await scenario.query("SELECT count(*) AS n FROM runs WHERE status = 'STARTED' AND job = 'faults-long'")
    return rows[0]["n"] if rows else 0


async def _at_least(scenario: Scenario, n: int) -> bool:
    return await _long_runs_live(scenario) >= n


async def test_heartbeat_service_stopped_for_twice_the_timeout(scenario: Scenario) -> None:
    await scenario.start_services()
    assert scenario.broker is not None
    await scenario.load.publish(scenario.broker)
    finished = await scenario.wait_finished(len(scenario.load.specs) // 5)
    with contextlib.suppress(AssertionError):  # or go on with what there is
        await harness.eventually(
            lambda: _at_least(scenario, LONG_LIVE), 15, interval=0.2, what=f"{LONG_LIVE} long runs started"
        )
    in_flight, long_live = await scenario.in_flight(), await _long_runs_live(scenario)
    pid = scenario.procs["heartbeat"].pid
    stall = 2 * LIMITS.heartbeat_timeout
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(stall)  # the fault's duration, not a synchronisation
    finally:
        os.kill(pid, signal.SIGCONT)
    report = await scenario.verdict(
        f"heartbeat service (pid {pid}) SIGSTOPped for {stall:g} s (2 x heartbeat_timeout) "
        f"at {finished} finished/{in_flight} in flight ({long_live} of them 5-7 s long), then SIGCONTed"
    )
    assert report.violations() == {}
    assert report.resumes == 0, report.resume_reasons
