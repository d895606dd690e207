"""The fleet benchmark (scripts/bench/fleet.py) in small, as a test of correctness only: the services
as separate processes (a launcher hosting a sim fleet, 2 heartbeat and 3 monitor replicas), a few
hundred virtual workers, then crashes, hangs and a monitor replica SIGKILLed mid-run. Nothing about
speed is asserted: every run must finish SUCCESS (0 lost, 0 stuck), every crash and hang must be
resumed exactly once, no attempt may have had two workers, nothing may be dead-lettered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_a_small_fleet_loses_nothing_and_resumes_each_fault_once() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench/fleet.py"), "--ci", "--runs", "300"],
        capture_output=True,
        timeout=150,
        cwd=ROOT,
    )
    out = done.stdout.decode(errors="replace")
    lines = [line for line in out.splitlines() if line.startswith("FLEET_RESULT ")]
    assert lines, f"no result (exit {done.returncode}):\n{out[-4000:]}\n{done.stderr.decode(errors='replace')[-4000:]}"
    result = orjson.loads(lines[-1].removeprefix("FLEET_RESULT "))
    assert result["problems"] == [], out[-4000:]
    for phase in ("crash", "hang", "replica_loss"):
        assert result[phase]["resumed"] == result[phase]["runs"] > 0
        assert result[phase]["resumed_twice"] == 0
    drained = result["drain"]
    assert (drained["success"], drained["lost"], drained["stuck"]) == (300, 0, 0)
    assert drained["attempts_with_two_workers"] == 0 and drained["dead_letters"] == 0
    assert done.returncode == 0
