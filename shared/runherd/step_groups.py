"""Steps of the ``launcher`` executor on the process launcher: each try runs in its own process
group (a session of its own) that outlives the worker, and is recorded in files beside the run's
worker records (``<log_dir>/<run_id>/steps/``):

- ``<name>.<try>.json``: the group's leader (pid, start time), when it started, the attempt that owns it;
- ``<name>.<try>.result.json``: what the try came to, written by the leader before it exits.

A resumed attempt looks for its step's try there: a live group is adopted (waited for, not started
again), a finished one's result is taken. ``reap`` stops the groups an attempt owned, so cancel,
max runtime and a hung worker's termination stop its steps too. Pure file and process handling;
the decisions (adopt, take, start anew) are in ``found``.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from runherd.launchers.process import RECORD_ENV, start_time
from runherd.signalling import signal_group

STEP_DIR_ENV = "RUNHERD_STEP_DIR"
ORPHAN_GRACE_ENV = "RUNHERD_STEP_ORPHAN_GRACE_SECONDS"
ORPHAN_GRACE_SECONDS = 60.0


def step_dir(run_id: str, environ: dict[str, str] | None = None) -> Path:
    """Beside the attempt's worker record (the process launcher's run dir), else a temp dir."""
    env = os.environ if environ is None else environ
    if env.get(STEP_DIR_ENV):
        return Path(env[STEP_DIR_ENV])
    if env.get(RECORD_ENV):
        return Path(env[RECORD_ENV]).parent / "steps"
    return Path(os.environ.get("TMPDIR", "/tmp")) / "runherd-steps" / run_id


def name(step_key: str) -> str:
    """A file name for any step key (keys may hold '/', spaces...)."""
    plain = re.sub(r"[^A-Za-z0-9_.-]", "_", step_key)[:40]
    return f"{plain}-{hashlib.sha256(step_key.encode()).hexdigest()[:12]}"


def record_path(folder: Path, step_key: str, try_: int) -> Path:
    return folder / f"{name(step_key)}.{try_}.json"


def result_path(folder: Path, step_key: str, try_: int) -> Path:
    return folder / f"{name(step_key)}.{try_}.result.json"


def write_json(path: Path, value: Any) -> None:
    """Atomically (a reader sees the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(value))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None


def alive(record: dict[str, Any]) -> bool:
    """The recorded leader still runs (same pid and start time, not a zombie left to a PID 1 that
    does not reap)."""
    pid, started = record.get("pid"), record.get("start_time")
    if not isinstance(pid, int) or started is None or start_time(pid) != started:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass(frozen=True)
class Found:
    """What an earlier attempt left of a step's try: ``adopt`` a live group, ``result`` of a
    finished one, or nothing (start the try)."""

    record: dict[str, Any] | None = None
    adopt: bool = False
    result: dict[str, Any] | None = None


def found(record: dict[str, Any] | None, is_alive: bool, result: dict[str, Any] | None) -> Found:
    if result is not None:
        return Found(record, result=result)
    if record is not None and is_alive:
        return Found(record, adopt=True)
    return Found()


def look(folder: Path, step_key: str, try_: int) -> Found:
    record = read_json(record_path(folder, step_key, try_))
    result = read_json(result_path(folder, step_key, try_))
    return found(record, record is not None and alive(record), result)


def reap(folder: Path, up_to_attempt: int | None) -> list[int]:
    """SIGKILL the live groups owned by attempts up to ``up_to_attempt`` (all if None)."""
    killed: list[int] = []
    if not folder.is_dir():
        return killed
    for path in folder.glob("*.json"):
        if path.name.endswith(".result.json"):
            continue
        record = read_json(path)
        if not isinstance(record, dict) or not alive(record):
            continue
        owner = record.get("owner_attempt")
        if up_to_attempt is not None and isinstance(owner, int) and owner > up_to_attempt:
            continue  # adopted by a newer attempt: not this one's to stop
        if signal_group(record["pid"], signal.SIGKILL):
            killed.append(record["pid"])
    return killed


def workers_alive(folder: Path) -> bool:
    """Some worker of the run is alive: the process launcher's attempt records beside ``folder``."""
    for path in folder.parent.glob("attempt-*.worker"):
        record = read_json(path)
        if isinstance(record, dict) and alive(record):
            return True
    return False


def orphaned_for(since: float | None, any_worker: bool, now: float) -> float | None:
    """Pure: when the step's group became an orphan (no worker of its run alive), or None."""
    if any_worker:
        return None
    return now if since is None else since
