"""Clocks are not trusted (issue 8, item 3): every worker of a load of 100 runs (and its steps)
runs under libfaketime (`FAKETIME=-60s`), 60 s behind the database, or 60 s ahead. Nothing
changes: no false hang (a worker behind must not look silent), and no hang detection switched off
(a worker ahead must not look heard in the future): two workers of the load are really hung
(SIGSTOPped), and exactly those two are resumed, as hung, within the heartbeat timeout and a few
sweeps, and succeed on attempt 2. Every run
finishes as the load says.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
from datetime import datetime

import pytest

from tests import harness
from tests.faults.invariants import Report
from tests.faults.scenario import LIMITS, Scenario

# The library itself, preloaded through `env` (which execs): the `faketime` command would run the
# worker as its child, and the launcher's handle would name faketime's pid, not the worker's.
LIBFAKETIME = sorted(
    glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
)

pytestmark = [
    pytest.mark.faults,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not LIBFAKETIME, reason="needs libfaketime (apt-get install -y faketime)"),
]

HUNG = 2
DETECTED_WITHIN = LIMITS.heartbeat_timeout + 10  # the timeout, two sweeps and a loaded machine


async def _hang(scenario: Scenario, n: int) -> tuple[set[str], datetime | None]:
    """SIGSTOP the workers of ``n`` long runs once they are under way: really hung workers; and
    when (the database's clock). Each is picked within 2 s of its start (the database's clock): a
    5-7 s run picked later may already have sent RUN_SUCCESS, not yet applied, and a worker stopped
    then is not hung (seen once at load 10)."""
    sql = (
        "SELECT r.run_id::text, a.handle FROM runs r JOIN attempts a ON a.run_id = r.run_id AND a.attempt = 1 "
        "WHERE r.status = 'STARTED' AND r.attempt = 1 AND r.job = 'faults-long' AND a.handle IS NOT NULL "
        "AND r.started_at > clock_timestamp() - interval '2 seconds' AND NOT r.run_id = ANY($1::uuid[]) LIMIT $2"
    )
    hung: set[str] = set()

    async def stopped_enough() -> bool:
        for row in await scenario.query(sql, sorted(hung), n - len(hung)) or []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(row["handle"]["pid"], signal.SIGSTOP)
                hung.add(str(row["run_id"]))
        return len(hung) >= n

    with contextlib.suppress(AssertionError):  # or go on with what there is
        await harness.eventually(stopped_enough, 40, interval=0.1, what=f"{n} long runs started")
    now = await scenario.query("SELECT clock_timestamp() AS now")
    return hung, now[0]["now"] if now else None


async def _only_the_hung_resumed(scenario: Scenario, report: Report, hung: set[str], at: datetime | None) -> None:
    rows = await scenario.query("SELECT run_id::text, message, ts FROM events WHERE type = 'RUN_RESUMED'") or []
    resumed = {r["run_id"] for r in rows}
    after = sorted((r["ts"] - at).total_seconds() for r in rows if at is not None and r["run_id"] in hung)
    report.notes.append(
        f"clock skew: {len(hung)} workers hung on purpose, {len(resumed & hung)} of them resumed, "
        f"{', '.join(f'{s:.1f}' for s in after)} s after the hang; {len(resumed - hung)} other runs resumed"
    )
    for r in rows:
        if r["run_id"] not in hung or "hung" not in (r["message"] or ""):
            report.examples["wrong_resumes"].append(f"{r['run_id']}: {r['message']}")
    for seconds in after:
        if seconds > DETECTED_WITHIN:
            report.examples["wrong_resumes"].append(f"a hung worker resumed only {seconds:.0f} s after it hung")
    for run_id in hung - resumed:
        report.examples["wrong_resumes"].append(f"{run_id}: hung (SIGSTOPped), never resumed")


@pytest.mark.parametrize("skew", ["-60s", "+60s"])
async def test_workers_with_a_skewed_clock(scenario: Scenario, skew: str) -> None:
    scenario.worker_prefix = ["env", f"LD_PRELOAD={LIBFAKETIME[0]}", f"FAKETIME={skew}"]
    await scenario.start_services()
    assert scenario.broker is not None
    await scenario.load.publish(scenario.broker)
    hung, at = await _hang(scenario, HUNG)
    report = await scenario.verdict(
        f"every worker's clock {skew} off the database's (libfaketime); {len(hung)} workers SIGSTOPped (hung)",
        extra=lambda r: _only_the_hung_resumed(scenario, r, hung, at),
    )
    assert report.violations() == {}
    assert len(hung) == HUNG, f"only {len(hung)} workers could be hung"
    assert not report.examples.get("wrong_resumes"), report.examples["wrong_resumes"]
    assert report.unexpected_outcomes == 0, report.examples["unexpected_outcomes"]
