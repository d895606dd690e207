"""SIGKILL of each service process in turn during one load of 100 runs, each restarted at once:
nothing is lost, stuck, doubled, changed after the end, resumed for nothing, published twice or
dead-lettered. The kills are spread over the load (one per fifth of it), so each hits runs in
every state; one load for all four keeps the suite's CPU (a Python process per run) affordable."""

from __future__ import annotations

import pytest

from tests.faults.scenario import SERVICES, Scenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


async def test_sigkill_each_service_in_turn(scenario: Scenario) -> None:
    await scenario.start_services()
    assert scenario.broker is not None
    await scenario.load.publish(scenario.broker)
    faults = []
    for turn, target in enumerate([*SERVICES, "outbox relay holder"], start=1):
        finished = await scenario.wait_finished(turn * len(scenario.load.specs) // 6)
        in_flight = await scenario.in_flight()
        service = target if target in SERVICES else await scenario.relay_holder()
        assert service is not None, "no service holds the outbox relay's advisory lock"
        pid = await scenario.kill(service)
        await scenario.restart(service)
        name = service if target == service else f"{service} (the relay holder)"
        faults.append(f"{name} pid {pid} at {finished} finished/{in_flight} in flight")
    report = await scenario.verdict("SIGKILL + restart of " + "; ".join(faults))
    assert report.violations() == {}
