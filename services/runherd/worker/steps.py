"""Runs one step as a subprocess: a `command`, or a `call` through runherd.worker.call_step.

Each step gets its own process group (so its children stop with it) and dies with the worker
(PR_SET_PDEATHSIG), so a SIGKILLed worker leaves no step running behind it; the group is recorded
(launchers/groups.py) so the launcher kills what the step left in it once the worker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import orjson

from runherd.contract import Step
from runherd.launchers import groups
from runherd.launchers.process import DETACHED_STEP_ENV, RECORD_ENV, start_time
from runherd.plan import MAX_OUTPUT_BYTES
from runherd.signalling import signal_group
from runherd.worker import logcap

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class StepResult:
    ok: bool
    output: Any = None
    error: str | None = None


class StepProcess:
    def __init__(self, step: Step) -> None:
        self.step = step
        self.proc: asyncio.subprocess.Process | None = None

    async def run(self, inputs: dict[str, Any], env: dict[str, str]) -> StepResult:
        out_path = None
        if self.step.call is not None:
            fd, out_path = tempfile.mkstemp(prefix="runherd-step-", suffix=".json")
            os.close(fd)
            argv = [sys.executable, "-m", "runherd.worker.call_step", self.step.call, out_path]
        else:
            argv = list(self.step.command or [])
        try:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                return StepResult(False, error=f"cannot start {argv[0]!r}: {exc.strerror}")
            # The launcher kills this group when the worker is gone (launchers/groups.py), unless it
            # belongs to a `launcher`-executor step, which outlives the worker to be adopted.
            if os.environ.get(DETACHED_STEP_ENV) != "1":
                groups.note(os.environ.get(RECORD_ENV), self.proc.pid, start_time(self.proc.pid))
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.proc.stdin.write(orjson.dumps(inputs))
                await self.proc.stdin.drain()
            self.proc.stdin.close()
            assert self.proc.stderr is not None
            stderr_tail = asyncio.ensure_future(_forward(self.proc.stderr))
            try:
                code = await asyncio.wait_for(self.proc.wait(), self.step.timeout_seconds)
            except TimeoutError:
                await self.stop(grace=0)
                stderr_tail.cancel()
                return StepResult(False, error=f"timed out after {self.step.timeout_seconds:g} s")
            last = await stderr_tail
            if code != 0:
                return StepResult(False, error=_describe(code) + (f": {last[-1]}" if last else ""))
            return _output_result(out_path) if out_path else StepResult(True)
        finally:
            if out_path:
                with contextlib.suppress(OSError):
                    os.unlink(out_path)

    async def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the step's process group, SIGKILL it after ``grace`` seconds."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if grace > 0:
            signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
                return
        signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)


async def _forward(stream: asyncio.StreamReader, keep: int = 5) -> list[str]:
    """Copy the step's stderr to the worker's (its log) and keep the last lines for the event log."""
    last: list[str] = []
    async for raw in stream:
        sys.stderr.buffer.write(raw)
        sys.stderr.flush()
        logcap.note(len(raw))
        line = raw.decode(errors="replace").rstrip()
        if line:
            last = [*last[-(keep - 1) :], line]
    return last


def output_too_large(size: int) -> str:
    return (
        f"output too large: {size} bytes of JSON, over the limit of {MAX_OUTPUT_BYTES} bytes "
        f"({MAX_OUTPUT_BYTES / 1048576:g} MiB) per step output; return a reference (a path, a URL) instead"
    )


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


def _output_result(path: str) -> StepResult:
    """The call's output, unless it is over the documented limit: then the step fails, saying so."""
    size = os.path.getsize(path)
    if size > MAX_OUTPUT_BYTES:
        return StepResult(False, error=output_too_large(size))
    with open(path, "rb") as f:
        data = f.read()
    return StepResult(True, output=orjson.loads(data) if data else None)
