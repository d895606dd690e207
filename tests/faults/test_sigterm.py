"""Graceful shutdown (issue 8, item 10): SIGTERM to each service in turn (launcher, heartbeat,
monitor) during a load of 100 runs, each restarted once it has exited. Each must exit 0 within
20 s, having stopped consuming, finished or requeued its batches and flushed the outbox; afterwards
nothing is applied twice (no transition logged twice, no status published under two message_ids)
and the invariants hold.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.scenario import SERVICES, Scenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

EXIT_WITHIN = 20.0


async def test_sigterm_each_service_in_turn(scenario: Scenario) -> None:
    await scenario.start_services()
    assert scenario.broker is not None
    await scenario.load.publish(scenario.broker)
    exits: dict[str, tuple[int | None, float]] = {}
    faults = []
    down = 0.0  # the longest a service was away: with one monitor, no event is applied meanwhile
    for turn, service in enumerate(SERVICES, start=1):
        finished = await scenario.wait_finished(turn * len(scenario.load.specs) // (len(SERVICES) + 2))
        in_flight = await scenario.in_flight()
        began = time.monotonic()
        exits[service] = code, seconds = await scenario.terminate(service, EXIT_WITHIN)
        await scenario.restart(service)
        down = max(down, time.monotonic() - began)
        said = "still running (SIGKILLed)" if code is None else f"exit {code}"
        faults.append(f"{service}: {said} after {seconds:.1f} s, at {finished} finished/{in_flight} in flight")
    report = await scenario.verdict("SIGTERM + restart of " + "; ".join(faults), deaf_seconds=down)
    assert report.violations() == {}
    slow = {s: e for s, e in exits.items() if e[0] != 0 or e[1] > EXIT_WITHIN}
    assert not slow, f"not a clean exit within {EXIT_WITHIN:g} s: {slow}"
