"""The default run launcher: each attempt is a local `runherd worker` subprocess.

The worker runs in its own process group with its own log file. Its handle names the pid *and*
the process start time (from /proc), so after a launcher restart a reused pid is never mistaken
for the worker.

One worker per attempt, even when the launcher dies between starting a worker and recording its
handle: each attempt has a *worker record*, ``<log_dir>/<run_id>/attempt-<n>.worker``, locked with
``flock`` by the launcher and handed to the worker as an open descriptor, so the lock lives exactly
as long as the worker does. A second launch of the attempt finds it locked (a worker is alive: its
handle is adopted) or unlocked with a record in it (the worker ran and exited: its exit is
reported); only a fresh attempt starts a process. The plan goes in ``attempt-<n>.plan.json``
(mode 0600), named by RUNHERD_PLAN_FILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from runherd.errors import ConfigError, LaunchError
from runherd.launchers import exits, groups
from runherd.launchers.base import Handle, Health, HealthStatus, RunLauncher, WorkerExit, WorkerRun
from runherd.launchers.forkserver import ForkServer
from runherd.signalling import signal_group

log = logging.getLogger("runherd.launchers.process")

_KEYS = {"worker_command", "log_dir", "terminate_grace_seconds", "env", "max_log_bytes", "inherit_env"}
_KEYS |= {"fork_server", "fork_server_spares"}
DEFAULT_FORK_SERVER_SPARES = 64
DEFAULT_WORKER_COMMAND = [sys.executable, "-m", "runherd.cli", "worker"]

# What a worker takes from the launcher's own environment: how to find programs and speak the
# locale, nothing that may hold a credential (issue 9: the launcher's RUNHERD_DATABASE_URL and
# RUNHERD_AMQP_URL once reached every step). More names with ``inherit_env``.
INHERITED_ENV = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM"}
    | {"PYTHONPATH", "VIRTUAL_ENV"}
)


def inherited(environ: Mapping[str, str], extra: frozenset[str] = frozenset()) -> dict[str, str]:
    """The part of the launcher's environment a worker gets: INHERITED_ENV, LC_*, and ``extra``."""
    return {k: v for k, v in environ.items() if k in INHERITED_ENV or k in extra or k.startswith("LC_")}


DEFAULT_MAX_LOG_BYTES = 64 * 1024 * 1024
LOG_MAX_ENV = "RUNHERD_LOG_MAX_BYTES"  # read by the worker, which rotates its own log
RECORD_ENV = "RUNHERD_WORKER_RECORD"  # the attempt's worker record, also read by the worker
# The `launcher` executor's steps outlive their worker on purpose (runherd.step_groups): not leftovers.
DETACHED_STEP_ENV = "RUNHERD_DETACHED_STEP"  # set to "1" in a `launcher`-executor step: not a leftover
MAX_EXITS_KEPT = 4096  # exit codes of reaped children kept for check_health, newest first
RECORD_WAIT_SECONDS = 5.0  # a locked record with nothing in it: its worker is starting up


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat; None: no such process.
    One raw read: a mass termination asks it of a thousand workers at once."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])  # fields 3 and 22 of stat, counted after "pid (comm)"


def start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot, or None if there is no such process."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _state(pid: int) -> str | None:
    stat = _stat(pid)
    return None if stat is None else stat[0]


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
    # A launch is a local fork (and the worker boots after it returns): a crash storm's 50
    # relaunches go out in one claim, not in rounds of 16.
    launch_concurrency = 64

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - _KEYS
        if unknown:
            raise ConfigError(
                f"run_launcher.config.{sorted(unknown)[0]}: unknown key for the process "
                f"launcher (known: {', '.join(sorted(_KEYS))})"
            )
        command = self.config.get("worker_command", DEFAULT_WORKER_COMMAND)
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise ConfigError("run_launcher.config.worker_command: expected a non-empty list of strings")
        self.worker_command: list[str] = command
        self.log_dir = Path(self.config.get("log_dir") or os.environ.get("RUNHERD_LOG_DIR", "var/logs"))
        self._log_root = self.log_dir.resolve()  # once: the paths in handles and records are absolute
        grace = self.config.get("terminate_grace_seconds", 10)
        if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
            raise ConfigError("run_launcher.config.terminate_grace_seconds: expected a number >= 0")
        self.grace = float(grace)
        self.env = dict(self.config.get("env") or {})
        extra = self.config.get("inherit_env", [])
        if not isinstance(extra, list) or not all(isinstance(n, str) for n in extra):
            raise ConfigError("run_launcher.config.inherit_env: expected a list of variable names")
        self.inherit_env = frozenset(extra)
        # Taken once, at the start: reading os.environ decodes every variable, ~2 ms a launch, which
        # 50 relaunches at once pay in a row on the event loop.
        self._inherited = inherited(os.environ, self.inherit_env)
        max_log = self.config.get("max_log_bytes", DEFAULT_MAX_LOG_BYTES)
        if isinstance(max_log, bool) or not isinstance(max_log, int) or max_log < 0:
            raise ConfigError("run_launcher.config.max_log_bytes: expected an integer >= 0 (0: no cap)")
        self.max_log_bytes = max_log
        fork = self.config.get("fork_server", False)
        if not isinstance(fork, bool):
            raise ConfigError("run_launcher.config.fork_server: expected true or false")
        spares = self.config.get("fork_server_spares", DEFAULT_FORK_SERVER_SPARES)
        if isinstance(spares, bool) or not isinstance(spares, int) or not 0 <= spares <= 1024:
            raise ConfigError("run_launcher.config.fork_server_spares: expected an integer from 0 to 1024")
        self._fork_server = ForkServer(spares) if fork else None
        self.host = socket.gethostname()
        # Live children only; the exit codes of reaped ones in a bounded map, by (pid, start time).
        self._children: dict[int, str] = {}  # pid -> "exec" (our child) or "fork" (the fork server's)
        # Our exec'd children not reaped yet: (start time, done at their exit). Until we reap one its
        # pid cannot name another process, so a terminate needs no /proc read and no pidfd for it.
        self._own: dict[int, tuple[int | None, asyncio.Future[None]]] = {}
        self._exited: OrderedDict[tuple[int, int | None], int] = OrderedDict()
        self._exits: asyncio.Queue[WorkerExit] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- launch ------------------------------------------------------------------------------

    async def launch(self, run: WorkerRun) -> Handle:
        log_path = self._log_root / run.run_id / f"attempt-{run.attempt}.log"
        # The file work (a dozen syscalls, 5-15 ms on a busy overlay filesystem) runs in a thread:
        # 50 relaunches at once would otherwise hold the event loop for half a second.
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_attempt, run, log_path))
        try:
            record_fd, locked, recorded, log_file = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_release_opened)  # the thread goes on: let go of what it opens
            raise
        try:
            if not locked:
                return await self._adopt_live(run, record_fd, log_path)
            if recorded is not None:
                return self._adopt_exited(run, recorded, log_path)
            assert log_file is not None
            return await self._start(run, record_fd, log_path, log_file)
        finally:
            os.close(record_fd)  # the worker holds its own copy, and with it the lock

    def _open_attempt(self, run: WorkerRun, log_path: Path) -> tuple[int, bool, dict[str, Any] | None, Any]:
        """The attempt's worker record, opened and locked if no worker holds it: (its descriptor,
        locked, what it records, the log opened for a fresh worker). For a fresh attempt the plan
        is written too. Blocking: called in a thread."""
        run_dir = log_path.parent
        try:
            if not run_dir.is_dir():  # a resumed attempt's is there: a stat, not a failing mkdir
                run_dir.mkdir(parents=True, exist_ok=True)
            record_fd = os.open(run_dir / f"attempt-{run.attempt}.worker", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LaunchError(f"cannot open the worker record in {run_dir}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(record_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return record_fd, False, None, None
            recorded = read_record(record_fd)
            if recorded is not None:
                return record_fd, True, recorded, None
            try:
                if run.plan:
                    write_private(log_path.with_name(f"attempt-{run.attempt}.plan.json"), run.plan.encode())
                log_file = open(log_path, "ab")  # noqa: SIM115 - a local file, handed to the child
            except OSError as exc:
                raise LaunchError(f"cannot write the worker's files in {run_dir}: {exc.strerror}") from exc
            return record_fd, True, None, log_file
        except BaseException:
            os.close(record_fd)
            raise

    async def _start(self, run: WorkerRun, record_fd: int, log_path: Path, log_file: Any) -> Handle:
        plan_path = log_path.with_name(f"attempt-{run.attempt}.plan.json")
        env = {
            **self._inherited,
            **self.env,
            **run.env,
            LOG_MAX_ENV: str(self.max_log_bytes),
            RECORD_ENV: str(log_path.with_name(f"attempt-{run.attempt}.worker")),
        }
        if run.plan:
            env.pop("RUNHERD_PLAN", None)
            env["RUNHERD_PLAN_FILE"] = str(plan_path)
        try:
            pid, how = await self._exec_or_fork(run, env, log_file, record_fd)
        except OSError as exc:
            raise LaunchError(f"cannot start worker {(run.command or self.worker_command)[0]}: {exc.strerror}") from exc
        finally:
            log_file.close()
        started = start_time(pid)
        record = {"pid": pid, "start_time": started, "host": self.host, "worker_id": run.worker_id}
        write_record(record_fd, record)
        handle = self._handle(run, record, log_path)
        self._children[pid] = how
        if how == "exec":
            self._own[pid] = (started, asyncio.get_running_loop().create_future())
        self._spawn(self._reap_child(pid, handle))
        log.info("launched worker pid %s run_id=%s attempt=%s", pid, run.run_id, run.attempt)
        return handle

    async def _exec_or_fork(
        self, run: WorkerRun, env: dict[str, str], log_file: Any, record_fd: int
    ) -> tuple[int, str]:
        """The worker's pid: forked from the warm fork server (launchers/forkserver.py) when it is on
        and the worker is runherd's own, else a fork-exec like asyncio's (its exit watched with a
        pidfd, launchers/exits.py, not a thread parked in waitpid per worker)."""
        if self._fork_server is not None and run.command is None and self.worker_command == DEFAULT_WORKER_COMMAND:
            return await self._fork_server.spawn(env, log_file.fileno(), record_fd, os.getcwd()), "fork"
        proc = subprocess.Popen(  # noqa: ASYNC220
            [*(run.command or self.worker_command)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(record_fd,),  # the lock goes with the worker
        )
        proc.returncode = 0  # reaped by _reap_child, not by subprocess
        return proc.pid, "exec"

    async def _adopt_live(self, run: WorkerRun, record_fd: int, log_path: Path) -> Handle:
        """The record is locked: a worker of this attempt is alive (launched by a launcher that
        died before recording its handle, or by a concurrent try). Take it over, start nothing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECORD_WAIT_SECONDS
        while (recorded := read_record(record_fd)) is None:
            if loop.time() >= deadline:
                raise LaunchError(
                    f"a worker of run {run.run_id} attempt {run.attempt} holds its record but has not written it yet",
                    transient=True,
                )
            await asyncio.sleep(0.05)
        handle = self._handle(run, recorded, log_path)
        log.warning(
            "adopting the live worker pid %s of an earlier launch run_id=%s attempt=%s",
            handle["pid"],
            run.run_id,
            run.attempt,
        )
        if handle["pid"] not in self._children:
            self._spawn(self._poll_adopted(handle))
        return handle

    def _adopt_exited(self, run: WorkerRun, recorded: dict[str, Any], log_path: Path) -> Handle:
        """The attempt's worker ran and exited: never start a second one; report its exit."""
        handle = self._handle(run, recorded, log_path)
        log.warning(
            "the worker of run_id=%s attempt=%s already ran (pid %s); reporting its exit",
            run.run_id,
            run.attempt,
            handle["pid"],
        )
        if handle["pid"] not in self._children:
            self._spawn(self._poll_adopted(handle))
        return handle

    def _handle(self, run: WorkerRun, record: dict[str, Any], log_path: Path) -> Handle:
        return {
            "launcher": self.name,
            "pid": record.get("pid"),
            "start_time": record.get("start_time"),
            "host": record.get("host", self.host),
            "log_path": str(log_path),
            "run_id": run.run_id,
            "attempt": run.attempt,
            "worker_id": record.get("worker_id") or "",
        }

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_child(self, pid: int, handle: Handle) -> None:
        if self._children.get(pid) == "fork":
            assert self._fork_server is not None
            code = await self._fork_server.exit_code(pid)
            if code is None:  # the fork server went away: watch it as an adopted worker
                self._children.pop(pid, None)
                await self._poll_adopted(handle)
                return
        else:
            try:
                code = await exits.reap(pid)
            except BaseException:
                own = self._own.pop(pid, None)
                if own is not None:
                    own[1].cancel()  # no longer watched (the launcher closes): health says the rest
                raise
            own = self._own.pop(pid, None)
            if own is not None and not own[1].done():
                own[1].set_result(None)
        self._children.pop(pid, None)
        self._exited[(pid, handle.get("start_time"))] = code
        while len(self._exited) > MAX_EXITS_KEPT:
            self._exited.popitem(last=False)
        if code != 0:
            kill_leftovers(handle)
        _remove_plan(handle)
        await self._exits.put(_exit_of(handle, code))

    # --- identity ----------------------------------------------------------------------------

    def _alive(self, handle: Handle) -> bool:
        """The handle's process still exists (same pid *and* start time) and is not a zombie."""
        pid = handle.get("pid")
        if not isinstance(pid, int) or handle.get("host") != self.host:
            return False
        if (pid, handle.get("start_time")) in self._exited:
            return False
        stat = _stat(pid)
        return stat is not None and stat[1] == handle.get("start_time") and stat[0] != "Z"

    # --- the interface ---------------------------------------------------------------------

    def can_reach(self, handle: Handle) -> bool:
        return handle.get("host") == self.host

    async def check_health(self, handle: Handle) -> Health:
        if handle.get("host") != self.host:
            return Health(HealthStatus.UNKNOWN, message=f"worker runs on host {handle.get('host')}, not on {self.host}")
        code = self._exited.get((handle.get("pid", -1), handle.get("start_time")))
        if code is not None:
            exit_ = _exit_of(handle, code)
            status = HealthStatus.SUCCESS if exit_.exit_code == 0 else HealthStatus.FAILED
            return Health(status, exit_code=exit_.exit_code, reason=exit_.reason, message=exit_.message)
        if self._alive(handle):
            return Health(HealthStatus.RUNNING)
        return Health(
            HealthStatus.NOT_FOUND,
            message=f"no process {handle.get('pid')} with the worker's start time: it has exited",
        )

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        result = (await self._terminate_many([handle], grace_seconds=grace_seconds))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def terminate_many(
        self, handles: list[Handle], *, grace_seconds: float | None = None
    ) -> list[bool | BaseException]:
        if type(self).terminate is not ProcessLauncher.terminate:  # a subclass stops workers its own way
            return await super().terminate_many(handles, grace_seconds=grace_seconds)
        return await self._terminate_many(handles, grace_seconds=grace_seconds)

    async def _terminate_many(
        self, handles: list[Handle], *, grace_seconds: float | None = None
    ) -> list[bool | BaseException]:
        """Signal every live worker's group at once, then wait for all their exits together (a
        pidfd each, which also watches a worker that is not our child: no polling), and force
        those still there after the grace. True for each worker that was found alive.

        Each group is signalled as soon as it is known to be ours, in one tight loop, so the last of
        a thousand goes a few tens of milliseconds after the first; with no grace (a worker that has
        nothing to save, such as one that never started) the first signal is SIGKILL."""
        grace = self.grace if grace_seconds is None else grace_seconds
        first = signal.SIGTERM if grace > 0 else signal.SIGKILL
        watched: list[tuple[Handle, asyncio.Future[None]]] = []
        results: list[bool | BaseException] = []
        for handle in handles:
            exited = self._exit_future(handle)
            results.append(exited is not None)
            if exited is not None:
                watched.append((handle, exited))
                signal_group(handle["pid"], first)
        try:
            stubborn = watched
            if watched and grace > 0:
                await asyncio.wait([f for _, f in watched], timeout=grace)
                stubborn = [(h, f) for h, f in watched if not f.done()]
                for handle, _ in stubborn:
                    pid, run_id, attempt = handle["pid"], handle.get("run_id"), handle.get("attempt")
                    log.info("killing worker pid %s run_id=%s attempt=%s", pid, run_id, attempt)
                    signal_group(handle["pid"], signal.SIGKILL)
            if stubborn:
                await asyncio.wait([f for _, f in stubborn], timeout=5)
        finally:
            for _, exited in watched:
                exited.cancel()
            _reap_step_groups(handles)
        return results

    def _exit_future(self, handle: Handle) -> asyncio.Future[None] | None:
        """A future done when the handle's worker exits (cancelling it stops the watch, nothing
        else); None if it is not alive now."""
        pid = handle.get("pid")
        if not isinstance(pid, int) or handle.get("host") != self.host:
            return None
        own = self._own.get(pid)
        if own is not None:
            # Our unreaped child: its pid is still its own, its reaper tells when it exits.
            return asyncio.shield(own[1]) if own[0] == handle.get("start_time") else None
        if (pid, handle.get("start_time")) in self._exited:
            return None
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None  # no such process
        if not self._alive(handle):  # checked with the pidfd open: it names this very process
            os.close(fd)
            return None
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not exited.done():
                exited.set_result(None)

        def release(_: object) -> None:
            loop.remove_reader(fd)
            os.close(fd)

        loop.add_reader(fd, ready)
        exited.add_done_callback(release)
        return exited

    async def debug_info(self, handle: Handle) -> str:
        path = handle.get("log_path")
        return tail(path) if path else ""

    def watch(self) -> AsyncIterator[WorkerExit]:
        return self._watch()

    async def _watch(self) -> AsyncIterator[WorkerExit]:
        while True:
            yield await self._exits.get()

    async def adopt(self, handles: list[Handle]) -> None:
        """Watch workers started by an earlier launcher process: not our children, so a pidfd
        tells when they exit (their pid and start time say it is them); their exit code is lost."""
        for handle in handles:
            if handle.get("host") != self.host or handle.get("pid") in self._children:
                continue
            self._spawn(self._poll_adopted(handle))

    async def _poll_adopted(self, handle: Handle) -> None:
        exited = self._exit_future(handle)  # a pidfd: it watches a process that is not our child
        if exited is not None:
            await exited
        kill_leftovers(handle)
        _remove_plan(handle)
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
        if self._fork_server is not None:
            await self._fork_server.close()  # its workers live on, as exec'd ones do


def _reap_step_groups(handles: list[Handle]) -> None:
    """The ``launcher`` executor's steps (process groups of their own, which outlive a crashed
    worker so that a resume can adopt them) stop with a worker that is stopped on purpose."""
    from runherd import step_groups

    for handle in handles:
        if handle.get("log_path"):
            step_groups.reap(Path(handle["log_path"]).parent / "steps", handle.get("attempt"))


def kill_leftovers(handle: Handle) -> list[int]:
    """SIGKILL what a dead worker's steps left behind (their children outlive the step's own
    PR_SET_PDEATHSIG): the step groups the worker recorded (launchers/groups.py), O(1) per exit."""
    path = handle.get("log_path")
    if not path:
        return []
    record = Path(path).with_name(f"attempt-{handle['attempt']}.worker")
    return groups.kill_recorded(record, handle["run_id"], handle["attempt"])


def read_record(fd: int) -> dict[str, Any] | None:
    """The worker record's content (pid, start time, host, worker id), or None while empty."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None  # half written: the writer is not done
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def write_record(fd: int, record: dict[str, Any]) -> None:
    data = orjson.dumps(record)
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (the plan holds the run's outputs), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def record_self(worker_id: str) -> None:
    """Called by the worker at its start: if the launcher died before writing the attempt's
    worker record, the worker writes it (its process group, which the launcher started), so the
    next launch of the attempt adopts it instead of starting a second worker."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDWR)
        try:
            if read_record(fd) is None:
                leader = os.getpgrp()
                host = socket.gethostname()
                record = {"pid": leader, "start_time": start_time(leader), "host": host, "worker_id": worker_id}
                write_record(fd, record)
        finally:
            os.close(fd)


def _release_opened(opening: asyncio.Future[tuple[int, bool, dict[str, Any] | None, Any]]) -> None:
    """A launch cancelled while its files were being opened: close them (and drop the record's lock)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    record_fd, _, _, log_file = opening.result()
    os.close(record_fd)
    if log_file is not None:
        log_file.close()


def _remove_plan(handle: Handle) -> None:
    """The plan file is read once, at the worker's start; it goes when the worker has exited."""
    path = handle.get("log_path")
    if path:
        with contextlib.suppress(OSError):
            Path(path).with_name(f"attempt-{handle['attempt']}.plan.json").unlink()


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
