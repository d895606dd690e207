"""The default run launcher: each attempt is a local `runherd worker` subprocess.

The worker runs in its own process group with its own log file. Its handle names the pid *and*
the process start time (from /proc), so after a launcher restart a reused pid is never mistaken
for the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from runherd.errors import ConfigError, LaunchError
from runherd.launchers.base import Handle, Health, HealthStatus, RunLauncher, WorkerExit, WorkerRun

log = logging.getLogger("runherd.launchers.process")

_KEYS = {"worker_command", "log_dir", "terminate_grace_seconds", "env"}


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of stat, counted after "pid (comm)"


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat[stat.rindex(")") + 2]


def tail(path: str | os.PathLike[str], lines: int = 40, max_bytes: int = 16_384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror})"
    return "\n".join(data.splitlines()[-lines:])


class ProcessLauncher(RunLauncher):
    name = "process"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - _KEYS
        if unknown:
            raise ConfigError(
                f"run_launcher.config.{sorted(unknown)[0]}: unknown key for the process "
                f"launcher (known: {', '.join(sorted(_KEYS))})"
            )
        command = self.config.get("worker_command", [sys.executable, "-m", "runherd.cli", "worker"])
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise ConfigError("run_launcher.config.worker_command: expected a non-empty list of strings")
        self.worker_command: list[str] = command
        self.log_dir = Path(self.config.get("log_dir") or os.environ.get("RUNHERD_LOG_DIR", "var/logs"))
        grace = self.config.get("terminate_grace_seconds", 10)
        if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
            raise ConfigError("run_launcher.config.terminate_grace_seconds: expected a number >= 0")
        self.grace = float(grace)
        self.env = dict(self.config.get("env") or {})
        self.host = socket.gethostname()
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._exits: asyncio.Queue[WorkerExit] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- launch ------------------------------------------------------------------------------

    async def launch(self, run: WorkerRun) -> Handle:
        log_path = self.log_dir / run.run_id / f"attempt-{run.attempt}.log"
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - a local file, handed to the child
        except OSError as exc:
            raise LaunchError(f"cannot open worker log {log_path}: {exc.strerror}") from exc
        env = {**os.environ, **self.env, **run.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *(run.command or self.worker_command),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start worker {(run.command or self.worker_command)[0]}: {exc.strerror}") from exc
        finally:
            log_file.close()
        handle: Handle = {
            "launcher": self.name,
            "pid": proc.pid,
            "start_time": start_time(proc.pid),
            "host": self.host,
            "log_path": str(log_path.resolve()),
            "run_id": run.run_id,
            "attempt": run.attempt,
        }
        self._children[proc.pid] = proc
        self._spawn(self._reap_child(proc, handle))
        log.info("launched worker pid %s run_id=%s attempt=%s", proc.pid, run.run_id, run.attempt)
        return handle

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_child(self, proc: asyncio.subprocess.Process, handle: Handle) -> None:
        code = await proc.wait()
        if code != 0:
            kill_leftovers(handle["run_id"], handle["attempt"])
        await self._exits.put(_exit_of(handle, code))

    # --- identity ----------------------------------------------------------------------------

    def _alive(self, handle: Handle) -> bool:
        """The handle's process still exists (same pid *and* start time) and is not a zombie."""
        pid = handle.get("pid")
        if not isinstance(pid, int) or handle.get("host") != self.host:
            return False
        proc = self._children.get(pid)
        if proc is not None and proc.returncode is not None:
            return False
        started = start_time(pid)
        return started is not None and started == handle.get("start_time") and _state(pid) != "Z"

    # --- the interface ---------------------------------------------------------------------

    def can_reach(self, handle: Handle) -> bool:
        return handle.get("host") == self.host

    async def check_health(self, handle: Handle) -> Health:
        if handle.get("host") != self.host:
            return Health(HealthStatus.UNKNOWN, message=f"worker runs on host {handle.get('host')}, not on {self.host}")
        proc = self._children.get(handle.get("pid", -1))
        if proc is not None and proc.returncode is not None:
            exit_ = _exit_of(handle, proc.returncode)
            status = HealthStatus.SUCCESS if exit_.exit_code == 0 else HealthStatus.FAILED
            return Health(status, exit_code=exit_.exit_code, reason=exit_.reason, message=exit_.message)
        if self._alive(handle):
            return Health(HealthStatus.RUNNING)
        return Health(
            HealthStatus.NOT_FOUND,
            message=f"no process {handle.get('pid')} with the worker's start time: it has exited",
        )

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        if not self._alive(handle):
            return False
        pid = handle["pid"]
        grace = self.grace if grace_seconds is None else grace_seconds
        if grace > 0:
            _killpg(pid, signal.SIGTERM)
            if await self._gone_within(handle, grace):
                return True
        log.info("killing worker pid %s run_id=%s attempt=%s", pid, handle.get("run_id"), handle.get("attempt"))
        _killpg(pid, signal.SIGKILL)
        await self._gone_within(handle, 5)
        return True

    async def _gone_within(self, handle: Handle, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._alive(handle):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def debug_info(self, handle: Handle) -> str:
        path = handle.get("log_path")
        return tail(path) if path else ""

    def watch(self) -> AsyncIterator[WorkerExit]:
        return self._watch()

    async def _watch(self) -> AsyncIterator[WorkerExit]:
        while True:
            yield await self._exits.get()

    async def adopt(self, handles: list[Handle]) -> None:
        """Watch workers started by an earlier launcher process: not our children, so we poll
        their pid and start time; their exit code is lost."""
        for handle in handles:
            if handle.get("host") != self.host or handle.get("pid") in self._children:
                continue
            self._spawn(self._poll_adopted(handle))

    async def _poll_adopted(self, handle: Handle) -> None:
        while self._alive(handle):
            await asyncio.sleep(0.5)
        kill_leftovers(handle["run_id"], handle["attempt"])
        await self._exits.put(
            WorkerExit(
                run_id=handle["run_id"],
                attempt=handle["attempt"],
                exit_code=None,
                reason="exited",
                message="worker exited while the launcher was not its parent; exit code unknown",
            )
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def kill_leftovers(run_id: str, attempt: int) -> list[int]:
    """SIGKILL what a dead worker's steps left behind (their children outlive the step's own
    PR_SET_PDEATHSIG). Steps carry RUNHERD_RUN_ID and RUNHERD_ATTEMPT, and so do their children."""
    wanted = {f"RUNHERD_RUN_ID={run_id}".encode(), f"RUNHERD_ATTEMPT={attempt}".encode()}
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = set(f.read().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    if killed:
        log.info("killed %d leftover step processes run_id=%s attempt=%s", len(killed), run_id, attempt)
    return killed


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _exit_of(handle: Handle, returncode: int) -> WorkerExit:
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
        return WorkerExit(
            run_id=handle["run_id"],
            attempt=handle["attempt"],
            exit_code=128 + sig,
            signal=sig,
            reason=name,
            message=f"worker killed by signal {sig} ({name})",
        )
    return WorkerExit(
        run_id=handle["run_id"],
        attempt=handle["attempt"],
        exit_code=returncode,
        message=f"worker exited with code {returncode}",
    )
