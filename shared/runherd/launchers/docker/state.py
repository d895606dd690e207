"""Reading a container's ``State``: the exit it records (code, signal, reason) and the Health it means."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runherd.launchers.base import Health, HealthStatus


def _signal_reason(exit_code: int) -> tuple[int | None, str | None]:
    """Shells and the engine report death by signal N as exit code 128 + N."""
    if 128 < exit_code < 128 + 65:
        try:
            sig = signal.Signals(exit_code - 128)
        except ValueError:
            return exit_code - 128, None
        return int(sig), sig.name
    return None, None


@dataclass(frozen=True)
class _Exit:
    exit_code: int | None
    signal: int | None
    reason: str | None
    message: str


def exit_from_state(name: str, state: Mapping[str, Any]) -> _Exit | None:
    """The exit recorded in a container's ``State``, or None while it has not exited."""
    status = state.get("Status")
    error = state.get("Error") or ""
    if status == "created" and error:
        # Start failed (bad command, missing mount): the engine records why, the process never ran.
        code = state.get("ExitCode") or 127
        return _Exit(code, None, "StartError", f"container {name} could not start: {error}")
    if status not in ("exited", "dead"):
        return None
    code = int(state.get("ExitCode", 0) or 0)
    sig, reason = _signal_reason(code)
    if state.get("OOMKilled"):
        reason = "OOMKilled"
        message = f"container {name} was killed for exceeding its memory limit (exit {code})"
    elif code == 0:
        message = f"container {name} exited with code 0"
    else:
        reason = reason or "Error"
        message = f"container {name} exited with code {code}" + (f" ({reason})" if sig else "")
    if error:
        message += f": {error}"
    return _Exit(code, sig, reason, message)


def health_from_inspect(info: Mapping[str, Any]) -> Health:
    name = str(info.get("Name", "")).lstrip("/") or str(info.get("Id", ""))[:12]
    state = info.get("State") or {}
    exit_ = exit_from_state(name, state)
    if exit_ is None:
        status = state.get("Status", "unknown")
        return Health(HealthStatus.RUNNING, message=f"container {name} is {status}")
    if exit_.exit_code == 0 and exit_.reason is None:
        return Health(HealthStatus.SUCCESS, exit_code=0, message=exit_.message)
    return Health(HealthStatus.FAILED, exit_code=exit_.exit_code, reason=exit_.reason, message=exit_.message)
