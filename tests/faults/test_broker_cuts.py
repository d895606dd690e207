"""A RabbitMQ connection cut for each service, through the TCP proxy in front of it: every open
connection dropped and new ones refused for a few seconds, during a load of 100 runs. Workers keep
their own connections (they do not go through the proxies), so each cut is the service's alone.

The launcher's cut holds today. The heartbeat service's and the monitor's do not: a heartbeat
pipeline silent for longer than the timeout, or an event backlog behind a cut monitor while its
sweeps go on, resumes live or finished workers (issue 8, item 2)."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.scenario import LIMITS, Scenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

CUT_SECONDS = 3.0


async def _cut_in_turn(scenario: Scenario, services: list[str], seconds: float) -> str:
    await scenario.start_services()
    assert scenario.broker is not None
    await scenario.load.publish(scenario.broker)
    faults = []
    for turn, service in enumerate(services, start=1):
        finished = await scenario.wait_finished(turn * len(scenario.load.specs) // (len(services) + 2))
        in_flight = await scenario.in_flight()
        proxy = scenario.proxies[service]
        dropped = proxy.open_connections
        proxy.cut(refuse_for=seconds)
        await asyncio.sleep(seconds)  # the fault's duration, not a synchronisation
        await scenario.ready(service)
        faults.append(
            f"{service}: {dropped} connection(s) cut, new ones refused for {seconds:g} s "
            f"({proxy.refused} refused) at {finished} finished/{in_flight} in flight"
        )
    return "; ".join(faults)


async def test_broker_cut_launcher(scenario: Scenario) -> None:
    report = await scenario.verdict(await _cut_in_turn(scenario, ["launcher"], CUT_SECONDS))
    assert report.violations() == {}


async def test_broker_cut_heartbeat_then_monitor(scenario: Scenario) -> None:
    # The heartbeat cut is longer than the heartbeat timeout, as a broker stall can be.
    fault = await _cut_in_turn(scenario, ["heartbeat", "monitor"], LIMITS.heartbeat_timeout + 1)
    report = await scenario.verdict(fault)
    assert report.violations() == {}
