"""Stopping one worker, and saying truthfully what became of it.

Used by the monitor (the sweeps, the reap rule, fencing) and by the launcher service (a ``kill``
request from a monitor that cannot reach the worker's host). The event log says
``WORKER_TERMINATED`` only when the run launcher confirmed it: it found the worker and stopped it,
or it confirms the worker is gone. Anything else (an error, a host this launcher cannot reach, a
worker still running) is ``WORKER_TERMINATE_FAILED`` (once per attempt) and a warning; the reap
rule tries again.

The ``kill`` request is internal: the routing key ``kill`` on ``runherd.commands``, body
``{"v": 1, "run_id", "attempt", "handle", "reason", "grace_seconds"}``. The launcher acts on the
handle it stored for that attempt, never on the one in the message.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from runherd.contract import parse_run_id
from runherd.errors import InvalidMessage
from runherd.launchers import Handle, Health, RunLauncher
from runherd.launchers.base import TERMINATE_CONCURRENCY
from runherd.store import RunRef, Store
from runherd.store import kills as kill_store

log = logging.getLogger("runherd.killing")

KILL_KEY = "kill"


@dataclass(frozen=True)
class Verdict:
    """What a terminate came to: ``confirmed`` goes into the log as WORKER_TERMINATED."""

    confirmed: bool
    exited: bool  # the worker is confirmed gone: its attempt's exit can be recorded
    message: str


def verdict(attempt: int, why: str, found: bool | None, health: Health | None, error: str | None) -> Verdict:
    """Pure: the terminate's result (``found``), the health asked afterwards, or the error."""
    if error is not None or found is None or health is None:
        return Verdict(False, False, f"could not terminate the worker of attempt {attempt} ({why}): {error}")
    if found:
        return Verdict(True, health.exited, f"terminated worker of attempt {attempt}: {why}")
    if health.exited:
        return Verdict(True, True, f"worker of attempt {attempt} was already gone ({why})")
    detail = f"{health.status.value}" + (f": {health.message}" if health.message else "")
    return Verdict(
        False, False, f"could not terminate the worker of attempt {attempt} ({why}): it was not found, health {detail}"
    )


async def kill(
    launcher: RunLauncher, store: Store, ref: RunRef, why: str, *, grace: float | None, source: str
) -> Verdict:
    """Terminate the worker of ``ref`` with this launcher (no transaction is open meanwhile) and
    record the outcome in one short transaction."""
    assert ref.handle is not None
    found: bool | None = None
    health: Health | None = None
    error: str | None = None
    try:
        found = await launcher.terminate(ref.handle, grace_seconds=grace)
        health = await launcher.check_health(ref.handle)
    except Exception as exc:
        error = repr(exc)
    result = verdict(ref.attempt, why, found, health, error)
    await record(store, ref, result, health, source=source)
    return result


async def kill_many(
    launcher: RunLauncher, store: Store, refs: list[RunRef], why: str, *, grace: float | None, source: str
) -> list[Verdict]:
    """``kill`` for many workers: one ``terminate_many`` (the launcher signals them all, then waits
    for all), their health asked with bounded concurrency, and every outcome recorded in one
    transaction."""
    handles = [r.handle for r in refs if r.handle is not None]
    assert len(handles) == len(refs)
    try:
        found: list[bool | BaseException] = await launcher.terminate_many(handles, grace_seconds=grace)
    except Exception as exc:
        found = [exc for _ in refs]
    slots = asyncio.Semaphore(TERMINATE_CONCURRENCY)

    async def health(handle: Handle) -> Health:
        async with slots:
            return await launcher.check_health(handle)

    healths = await asyncio.gather(*(health(h) for h in handles), return_exceptions=True)
    verdicts: list[Verdict] = []
    confirmed: list[tuple[RunRef, str, dict[str, Any], bool]] = []
    failed: list[tuple[RunRef, str, dict[str, Any]]] = []
    for ref, f, h in zip(refs, found, healths, strict=True):
        error = repr(f) if isinstance(f, BaseException) else repr(h) if isinstance(h, BaseException) else None
        got = None if isinstance(f, BaseException) else f
        hh = None if isinstance(h, BaseException) else h
        result = verdict(ref.attempt, why, got if error is None else None, hh if error is None else None, error)
        verdicts.append(result)
        data = _data(hh)
        if result.confirmed:
            log.info("%s run_id=%s attempt=%s", result.message, ref.run_id, ref.attempt)
            confirmed.append((ref, result.message, data, result.exited))
        else:
            log.warning("%s run_id=%s attempt=%s", result.message, ref.run_id, ref.attempt)
            failed.append((ref, result.message, data))
    await kill_store.record_outcomes(store, confirmed, failed, source=source, reason="terminated by runherd")
    return verdicts


def _data(health: Health | None) -> dict[str, Any]:
    return {
        "health": health.status.value if health else None,
        "exit_code": health.exit_code if health else None,
    }


async def record(store: Store, ref: RunRef, result: Verdict, health: Health | None, *, source: str) -> None:
    data = _data(health)
    if result.confirmed:
        log.info("%s run_id=%s attempt=%s", result.message, ref.run_id, ref.attempt)
        await kill_store.record_terminated(
            store, ref, result.message, source=source, data=data, exited=result.exited, reason="terminated by runherd"
        )
    else:
        log.warning("%s run_id=%s attempt=%s", result.message, ref.run_id, ref.attempt)
        await kill_store.record_failure(store, ref, result.message, source=source, data=data)


# --- the internal kill request ---------------------------------------------------------------


@dataclass(frozen=True)
class KillRequest:
    run_id: str
    attempt: int
    handle: Handle
    reason: str
    grace_seconds: float | None


def request_body(ref: RunRef, reason: str, grace: float | None) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "run_id": ref.run_id,
            "attempt": ref.attempt,
            "handle": ref.handle,
            "reason": reason,
            "grace_seconds": grace,
        }
    )


def parse_request(data: Any) -> KillRequest:
    """Validates a kill request; raises InvalidMessage naming the field."""
    if not isinstance(data, dict) or data.get("v") != 1:
        raise InvalidMessage('kill: expected an object with "v": 1')
    run_id, attempt, handle = data.get("run_id"), data.get("attempt"), data.get("handle")
    reason, grace = data.get("reason"), data.get("grace_seconds")
    run_id = parse_run_id(run_id)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise InvalidMessage("kill: attempt: expected an integer >= 1")
    if not isinstance(handle, dict):
        raise InvalidMessage("kill: handle: expected an object")
    if not isinstance(reason, str):
        raise InvalidMessage("kill: reason: expected a string")
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0):
        raise InvalidMessage("kill: grace_seconds: expected a number >= 0 or null")
    return KillRequest(run_id, attempt, handle, reason, None if grace is None else float(grace))
