"""Issue 8, item 3: clocks are not trusted. Workers run with their clock 60 s behind or ahead of the
database's; every deadline is computed with the database's clock, so the skew changes nothing: no
false hang, and hang detection is not switched off by a future time.

The skew is made by tests/fixtures/skewed_worker.py (the real worker with runherd's clock shifted,
which is every timestamp a worker sends), and again by libfaketime preloaded into the worker (the
whole process's clock, and its steps'), as tests/faults/test_clock_skew.py does. The library is
preloaded through ``env``, which execs: the ``faketime`` command would run the worker as its child.
(With that command, these tests were once opt-in: on the shared test machine each such run coincided
with every process on the machine being SIGKILLed, cause not found. Every process-group signal of
runherd now goes through ``runherd.signalling.signal_group``, which refuses group 1, whose
``killpg`` is ``kill(-1)``.)"""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import uuid

import pytest

from tests.harness import PYTHON, ROOT, SILENT, Env, eventually

TIMEOUT = 4.0  # heartbeat_timeout_seconds of the fast config
SHIFT = [PYTHON, str(ROOT / "tests" / "fixtures" / "skewed_worker.py")]
LIBFAKETIME = sorted(
    glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
)
SKEWS = [pytest.param("shift", -60, id="-60s"), pytest.param("shift", 60, id="+60s")] + [
    pytest.param(
        "faketime",
        seconds,
        id=f"faketime{seconds:+d}s",
        marks=pytest.mark.skipif(not LIBFAKETIME, reason="needs libfaketime (apt-get install -y faketime)"),
    )
    for seconds in (-60, 60)
]


def skewed(how: str, seconds: int, script: list[str] | None = None) -> list[str]:
    """The worker command with its clock ``seconds`` off; ``script``: a fixture worker instead."""
    if how == "faketime":
        worker = script or [PYTHON, "-m", "runherd.cli", "worker"]
        return ["env", f"LD_PRELOAD={LIBFAKETIME[0]}", f"FAKETIME={seconds:+d}s", *worker]
    return [*SHIFT, str(seconds), *(script[1:] if script else [])]


async def _heard(env: Env, run_ids: list[str]) -> bool:
    rows = await env.store.fetch(
        "SELECT count(*) AS n FROM attempts a JOIN runs r ON r.run_id = a.run_id AND r.attempt = a.attempt "
        "WHERE a.run_id = ANY($1::uuid[]) AND a.last_heartbeat_at IS NOT NULL",
        [uuid.UUID(r) for r in run_ids],
    )
    return rows[0]["n"] == len(run_ids)


async def _running_for(env: Env, seconds: float) -> bool:
    rows = await env.store.fetch(
        "SELECT bool_and(started_at < clock_timestamp() - make_interval(secs => $1)) AS ok FROM runs", seconds
    )
    return bool(rows[0]["ok"])


async def _worker_clock_offsets(env: Env, run_ids: list[str], want: int) -> list[float] | None:
    """Each run's first RUN_START as its worker stamped it, less its launch as the database did: the
    skew really reached the worker's clock (a preload that silently failed would prove nothing).
    None until ``want`` of them are applied."""
    rows = await env.store.fetch(
        "SELECT extract(epoch FROM e.ts - a.launched_at)::float8 AS offset FROM events e "
        "JOIN attempts a ON a.run_id = e.run_id AND a.attempt = e.attempt "
        "WHERE e.type = 'RUN_START' AND e.attempt = 1 AND e.run_id = ANY($1::uuid[])",
        [uuid.UUID(r) for r in run_ids],
    )
    return [r["offset"] for r in rows] if len(rows) >= want else None


async def _resumed(env: Env) -> list[str]:
    rows = await env.store.fetch("SELECT run_id FROM events WHERE type = 'RUN_RESUMED' ORDER BY id")
    return [str(r["run_id"]) for r in rows]


@pytest.mark.parametrize(("how", "seconds"), SKEWS)
async def test_skewed_workers_succeed_unresumed_and_a_skewed_hung_worker_is_found(
    env: Env, how: str, seconds: int
) -> None:
    env.configure(run_launcher=env.process_launcher(skewed(how, seconds)))
    await env.start()
    done = env.tmp / "done"
    step = ["sh", "-c", f'while [ ! -e "{done}" ]; do sleep 0.2; done']
    runs = [await env.submit([{"key": "wait", "command": step}]) for _ in range(5)]
    await eventually(lambda: _heard(env, runs), timeout=60, what="5 skewed workers heard")
    # A heartbeat can be written before its worker's RUN_START is applied (two queues).
    offsets = await eventually(
        lambda: _worker_clock_offsets(env, runs, len(runs)), timeout=30, what="every RUN_START applied"
    )
    assert all(abs(o - seconds) < 20 for o in offsets), offsets

    hung = runs[0]
    handle = await env.handle(hung, attempt=1)
    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    os.killpg(handle["pid"], signal.SIGSTOP)  # the worker (and faketime over it)
    await eventually(lambda: _resumed(env), timeout=30, what="the hung skewed worker resumed")
    detected = loop.time() - stopped_at
    assert await _resumed(env) == [hung]
    assert detected < TIMEOUT + 6, detected
    await eventually(lambda: _heard(env, [hung]), timeout=30, what="the resumed attempt heard")
    await eventually(lambda: _running_for(env, 2 * TIMEOUT), timeout=30, what="every run past 2 x the timeout")

    done.touch()
    for run_id in runs:
        run = await env.wait_status(run_id, "SUCCESS", timeout=60)
        assert run["attempt"] == (2 if run_id == hung else 1)
    assert await _resumed(env) == [hung]
    print(f"\nworker clock {seconds:+d} s ({how}): 5 runs SUCCESS, 1 resume (the hung one, found in {detected:.1f} s)")


@pytest.mark.parametrize(("how", "seconds"), SKEWS)
async def test_a_silent_worker_with_a_skewed_clock_is_still_detected(env: Env, how: str, seconds: int) -> None:
    """A worker that never heartbeats is measured from its launch, in the database's clock (the start
    grace: the longer of the heartbeat and start timeouts). The start timeout is 8 s, not 3: a worker
    booting on a loaded machine took longer than 3 s to report RUN_START, and its run failed as not
    started instead of as silent."""
    env.configure(
        run_monitoring={"max_resume_run_attempts": 0, "start_timeout_seconds": 8},
        run_launcher=env.process_launcher(skewed(how, seconds, SILENT)),
    )
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    run = await env.wait_status(run_id, "FAILURE", timeout=30)
    assert "no heartbeat" in run["reason"] and "never sent one" in run["reason"]
