"""PostgreSQL stopped for 12 s (a fast shutdown of the private cluster: sessions see AdminShutdown)
while 20+ runs are in flight and 20 launches are published during the outage, then started again.
Issue 8, item 1: a database outage loses nothing, dead-letters nothing, resumes nothing, and no
service process exits because of it."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.scenario import Scenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

OUTAGE_SECONDS = 12.0
DURING_OUTAGE = 20


async def test_postgres_restart_during_load(scenario: Scenario) -> None:
    await scenario.start_services()
    assert scenario.broker is not None
    before, during = scenario.load.specs[:-DURING_OUTAGE], scenario.load.specs[-DURING_OUTAGE:]
    await scenario.load.publish(scenario.broker, before)
    in_flight = await scenario.wait_in_flight(20)
    began = time.monotonic()
    await asyncio.to_thread(scenario.cluster.stop)
    await scenario.load.publish(scenario.broker, during)
    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - began)))  # the outage's length
    await asyncio.to_thread(scenario.cluster.start)
    outage = time.monotonic() - began
    report = await scenario.verdict(
        f"PostgreSQL stopped (fast) for {outage:.1f} s with {in_flight} runs in flight, "
        f"{len(during)} launches published during the outage",
        finish_timeout=50,
        deaf_seconds=outage,
    )
    assert report.violations() == {}
