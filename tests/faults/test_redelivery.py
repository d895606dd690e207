"""Redelivery never creates a second run (issue 8, item 8). A load of 100 launches without
`run_id`, each with an AMQP message_id, and 20 reexecutes without `new_run_id`: every message is
published twice with the same message_id (the second copy arrives after the first was applied, as
a redelivery after the commit and before the ack does), and the launcher is SIGKILLed (and
restarted) between the two copies of each. Each message_id makes exactly one run, whose id is
derived from it (`runherd.contract.run_id_from_message_id`); the only other runs are the load's
own retries.
"""

from __future__ import annotations

import uuid
from collections import Counter

import orjson
import pytest

from runherd.broker import COMMANDS
from runherd.contract import run_id_from_message_id
from tests import harness
from tests.faults.invariants import Report
from tests.faults.load import Load, RunSpec
from tests.faults.scenario import Scenario

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

REEXECUTES = 20


def _without_run_id(spec: RunSpec) -> RunSpec:
    message_id = f"launch-{uuid.uuid4()}"
    body = {k: v for k, v in spec.body.items() if k != "run_id"}
    return RunSpec(
        run_id=run_id_from_message_id("launch", message_id),
        kind=spec.kind,
        body=body,
        expected=spec.expected,
        message_id=message_id,
    )


async def _one_run_per_message(scenario: Scenario, report: Report, reexecuted: dict[str, str]) -> None:
    """Every run is a derived launch, a derived reexecute (one per origin) or a retry."""
    runs = await scenario.query("SELECT run_id::text, parent_run_id::text, retry_number FROM runs") or []
    launches = {spec.run_id for spec in scenario.load.specs}
    derived = launches | set(reexecuted.values())
    retries = [r for r in runs if r["retry_number"] > 0]
    others = [r for r in runs if r["run_id"] not in derived and r["retry_number"] == 0]
    per_origin = Counter(r["parent_run_id"] for r in runs if r["retry_number"] == 0 and r["parent_run_id"])
    missing = derived - {r["run_id"] for r in runs}
    report.notes.append(
        f"redelivery: {len(launches)} launch and {len(reexecuted)} reexecute message_ids, each published twice; "
        f"{len(runs)} runs = {len(derived) - len(missing)} derived + {len(retries)} retries + {len(others)} others; "
        f"origins re-executed more than once {sum(1 for n in per_origin.values() if n > 1)}"
    )
    for r in others:
        report.examples["second_runs"].append(
            f"{r['run_id']}: not derived from any message_id (parent {r['parent_run_id']})"
        )
    for origin, n in per_origin.items():
        if n > 1:
            report.examples["second_runs"].append(f"{origin}: re-executed {n} times")
    for run_id in missing:
        report.examples["second_runs"].append(f"{run_id}: derived id never stored")


async def _kill_launcher(scenario: Scenario) -> int:
    pid = await scenario.kill("launcher")
    await scenario.restart("launcher")
    return pid


async def test_redelivered_launch_and_reexecute_make_one_run(scenario: Scenario) -> None:
    scenario.load = Load([_without_run_id(spec) for spec in scenario.load.specs])
    await scenario.start_services()
    assert scenario.broker is not None
    load = scenario.load
    await load.publish(scenario.broker)
    finished = await scenario.wait_finished(len(load.specs) // 4)
    await _kill_launcher(scenario)
    await load.publish(scenario.broker)  # the same launches, the same message_ids

    # Re-execute finished `command` runs (ALL_STEPS: each reexecute is a real run that succeeds).
    origins = [spec.run_id for spec in load.specs if spec.kind == "command"][:REEXECUTES]

    async def origins_done() -> bool:
        rows = await scenario.query(
            "SELECT count(*) AS n FROM runs WHERE run_id = ANY($1::uuid[]) AND status IN ('SUCCESS', 'FAILURE')",
            origins,
        )
        return bool(rows) and rows[0]["n"] == len(origins)

    await harness.eventually(origins_done, 60, interval=0.3, what="the runs to re-execute to finish")
    messages = {origin: f"reexecute-{uuid.uuid4()}" for origin in origins}
    reexecuted = {origin: run_id_from_message_id("reexecute", mid) for origin, mid in messages.items()}
    load.published.extend(reexecuted.values())
    for copy in range(2):
        for origin, message_id in messages.items():
            body = orjson.dumps({"v": 1, "run_id": origin, "strategy": "ALL_STEPS"})
            await scenario.broker.publish(COMMANDS, "reexecute", body, message_id=message_id)
        if copy == 0:
            await _kill_launcher(scenario)
    report = await scenario.verdict(
        f"{len(load.specs)} launches and {len(messages)} reexecutes each published twice with one message_id; "
        f"launcher SIGKILLed and restarted between the copies (at {finished} finished, and after the reexecutes)",
        extra=lambda r: _one_run_per_message(scenario, r, reexecuted),
    )
    assert report.violations() == {}
    assert not report.examples.get("second_runs"), report.examples["second_runs"]
