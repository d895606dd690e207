"""What `runherd show` says about a run's steps, read from its event log (pure): the executor,
each step's tries with their reasons and handles, and the overrides a re-executed run was given."""

from __future__ import annotations

from typing import Any

_STARTS = ("STEP_START", "STEP_RESTARTED")


def step_tries(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Step key -> its tries, oldest first: try number, attempt, status, reason, handle."""
    tries: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        key, data = e.get("step_key"), e.get("data") or {}
        if not key or e.get("refused") or not str(e.get("type", "")).startswith("STEP_"):
            continue
        mine = tries.setdefault(key, [])
        if e["type"] in _STARTS:
            if mine and mine[-1]["status"] == "RUNNING":  # its worker stopped before the try ended
                mine[-1].update(status="INTERRUPTED", reason=f"the worker of attempt {mine[-1]['attempt']} stopped")
            mine.append(
                {
                    "try": int(data.get("try") or 1),
                    "attempt": e["attempt"],
                    "status": "RUNNING",
                    "reason": None,
                    "handle": data.get("handle"),
                }
            )
            continue
        if not mine:
            continue
        last = mine[-1]
        if e["type"] == "STEP_UP_FOR_RETRY":
            last.update(status="FAILURE", reason=data.get("reason") or e.get("message"))
            last["retry_in_seconds"] = data.get("delay_seconds")
        elif e["type"] == "STEP_FAILURE":
            last.update(status="FAILURE", reason=e.get("message"))
        elif e["type"] == "STEP_SUCCESS":
            last.update(status="SUCCESS")
    return tries


def executor_of(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The executor the latest attempt's worker ran with (its RUN_START)."""
    for e in reversed(events):
        if e.get("type") == "RUN_START" and not e.get("refused") and (e.get("data") or {}).get("executor"):
            return {"name": e["data"]["executor"], "max_concurrent": e["data"].get("max_concurrent")}
    return None


def overrides_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What a re-executed run was given (``--with``, ``--job-name``, ``--max-runtime``, ``--executor``)."""
    for e in events:
        if e.get("type") == "REEXECUTED":
            return dict((e.get("data") or {}).get("overrides") or {})
    return {}


def tries_lines(tries: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per try of every step that took more than one (or whose one try has a handle)."""
    out = []
    for key, mine in tries.items():
        if len(mine) < 2 and not any(t.get("handle") for t in mine):
            continue
        for t in mine:
            handle = f"  handle {t['handle']}" if t.get("handle") else ""
            reason = f": {t['reason']}" if t.get("reason") else ""
            out.append(f"  {key}  try {t['try']} (attempt {t['attempt']}) {t['status']}{reason}{handle}")
    return out
