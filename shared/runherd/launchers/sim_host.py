"""The sim fleet in a process of its own (``fleet_process: true``): the child's entry point
(``python -m runherd.launchers.sim_host``), the protocol it speaks with the launcher, and the
launcher's side of it (``FleetProcess``).

Why a process: at 10,000 virtual workers a fleet in a thread of the launcher service shares one
interpreter with it (the GIL), and the launch path waits behind the fleet's heartbeats (the intake of
10,000 launches took 18.7 s instead of 0.08 s). In a child process the fleet has a core of its own.
The workers are the same code (``runherd.launchers.sim``: ``Fleet``, ``VirtualWorker``,
``Connections``); only where they live changes.

The protocol: a socketpair, the child's end passed as ``--fd``. Each frame is a 4-byte big-endian
length, then an orjson array of messages: every message of one loop iteration goes in one frame, so a
launch storm is a few large writes. Each message is an object with ``op``:

launcher -> fleet
  ``configure`` {cfg, config}: a launcher's SimConfig under a key its launches name (seed, connections)
  ``launch`` {cfg, run, worker_id, handle}: the WorkerRun's fields; no reply (the launcher already
  made the handle, and an exit comes back if the worker cannot start)
  ``terminate`` {id, worker_id, grace} -> bool; ``debug`` {id, worker_id} -> str | None
  ``command`` {action, run_ids}; ``stop`` {id, worker_ids}: a closing launcher's workers end with it
  ``close`` {id}: every worker stops, then the process exits
fleet -> launcher
  ``reply`` {id, value}; ``exit`` {worker_id, exit}: the WorkerExit's fields, as it happens;
  ``lag`` {seconds}: the fleet loop's timer lag, which the launcher's /metrics shows as
  ``runherd_event_loop_lag_seconds{loop="sim-fleet"}``

The launcher sees every launch and every exit in order, so it answers ``check_health``, ``adopt`` and
``command``'s count itself; only ``terminate`` and ``debug_info`` ask the fleet. When the fleet process
dies (its end of the socket closes) every worker it hosted is reported exited through ``watch()``.
When the launcher's process dies, the fleet process sees its socket close and exits at once, as the
workers of a thread fleet would die with their process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import struct
import sys
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from runherd import metrics
from runherd.errors import InvalidMessage, LaunchError
from runherd.launchers.base import Handle, Health, HealthStatus, WorkerExit, WorkerRun
from runherd.launchers.process import start_time
from runherd.probes import watch_gc_pauses, watch_loop_lag

if TYPE_CHECKING:
    from runherd.launchers.sim import Fleet, SimConfig, SimLauncher, VirtualWorker

log = logging.getLogger("runherd.launchers.sim")
HEADER = struct.Struct(">I")
MAX_EXITS_KEPT = 20_000
# Exited workers' logs, by worker id, of every fleet process of this launcher process. A log comes
# with its exit: debug_info of a crash storm's hundred exits does not wait on a fleet loop busy with
# those same crashes (it once took seconds), and it outlives a fleet process that dies.
_EXITED_LOGS: OrderedDict[str, str] = OrderedDict()


def _keep_log(worker_id: str, log: str) -> None:
    _EXITED_LOGS[worker_id] = log
    while len(_EXITED_LOGS) > MAX_EXITS_KEPT:
        _EXITED_LOGS.popitem(last=False)


def exited_log(worker_id: str) -> str | None:
    """The log of a worker that exited in a fleet process of this process, if it is still kept."""
    return _EXITED_LOGS.get(worker_id)


CLOSE_SECONDS = 60.0  # a closing launcher waits this long for the fleet to stop its workers
EXIT_SECONDS = 10.0  # ... and then for the process to exit, before it kills it


class FleetGone(Exception):
    """The fleet process is gone: a request can have no reply."""


# --- the protocol ------------------------------------------------------------------------------


def encode(messages: list[dict[str, Any]]) -> bytes:
    """One frame: the messages' length-prefixed orjson array."""
    body = orjson.dumps(messages)
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> list[dict[str, Any]] | None:
    """The next frame's messages; None at the end of the stream (the other side is gone)."""
    try:
        header = await reader.readexactly(HEADER.size)
        body = await reader.readexactly(HEADER.unpack(header)[0])
    except asyncio.IncompleteReadError:
        return None
    messages = orjson.loads(body)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "op" in m for m in messages):
        raise InvalidMessage("sim fleet: a frame is an array of objects with an op")
    return messages


def to_wire(value: Any) -> dict[str, Any]:
    """A dataclass (WorkerRun, WorkerExit, SimConfig) as plain JSON fields."""
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def run_from_wire(data: dict[str, Any]) -> WorkerRun:
    return WorkerRun(**data)


def exit_from_wire(data: dict[str, Any]) -> WorkerExit:
    return WorkerExit(**data)


class Outbox:
    """Messages sent together, one frame per loop iteration."""

    def __init__(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        self.writer = writer
        self.loop = loop
        self.batch: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        if not self.batch:
            self.loop.call_soon(self.flush)
        self.batch.append(message)

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        if batch and not self.writer.is_closing():
            self.writer.write(encode(batch))


# --- the launcher's side -----------------------------------------------------------------------


@dataclass
class Remote:
    """A live worker of the fleet process, as the launcher knows it."""

    run_id: str
    attempt: int
    handle: Handle
    owners: set[SimLauncher] = field(default_factory=set)


class FleetProcess:
    """The launcher's end of one fleet process, shared by the sim launchers of this process (as the
    thread fleet is) on the loop that started it."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        fleet_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.proc = proc
        self.id = fleet_id
        self.pid = proc.pid
        self.started = start_time(proc.pid)
        self.host = socket.gethostname()
        self.writer = writer
        self.out = Outbox(writer, self.loop)
        self.live: dict[str, Remote] = {}  # worker_id -> worker
        self.by_attempt: dict[tuple[str, int], Remote] = {}
        self.done: OrderedDict[str, WorkerExit] = OrderedDict()
        self.users: dict[SimLauncher, int] = {}  # launcher -> the key of its config
        self.alive = True
        self.closing = False
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._lag = metrics.LOOP_LAG.labels("sim-fleet")
        self._reading = asyncio.ensure_future(self._read(reader))

    @classmethod
    async def start(cls) -> FleetProcess:
        fleet_id = uuid.uuid4().hex[:12]
        ours, theirs = socket.socketpair()
        level = logging.getLevelName(logging.getLogger("runherd").getEffectiveLevel())
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "runherd.launchers.sim_host",
                "--fd",
                str(theirs.fileno()),
                "--fleet",
                fleet_id,
                "--log-level",
                str(level),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise LaunchError(f"sim: cannot start the fleet process: {exc}") from exc
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        log.info("sim: fleet %s runs in process %d", fleet_id, proc.pid)
        return cls(proc, fleet_id, reader, writer)

    # --- what launchers ask -------------------------------------------------------------------

    def attach(self, launcher: SimLauncher) -> None:
        """The launcher's workers live here from now on; its config is sent once."""
        if launcher not in self.users:
            key = self.users[launcher] = next(self._ids)
            self.out.send({"op": "configure", "cfg": key, "config": to_wire(launcher.cfg)})

    def launch(self, launcher: SimLauncher, run: WorkerRun, worker_id: str, handle: Handle) -> None:
        """Without a round trip: the worker is known live here at once, and an exit comes back if it
        cannot start."""
        self.attach(launcher)
        remote = Remote(run.run_id, run.attempt, handle, {launcher})
        self.live[worker_id] = remote
        self.by_attempt[(run.run_id, run.attempt)] = remote
        message = {"op": "launch", "cfg": self.users[launcher], "run": to_wire(run), "worker_id": worker_id}
        self.out.send({**message, "handle": handle})

    def health(self, worker_id: str) -> Health:
        if worker_id in self.live:
            return Health(HealthStatus.RUNNING)
        exit_ = self.done.get(worker_id)
        if exit_ is None:
            return Health(HealthStatus.NOT_FOUND, message=f"no virtual worker {worker_id}")
        status = HealthStatus.SUCCESS if exit_.exit_code == 0 else HealthStatus.FAILED
        return Health(status, exit_code=exit_.exit_code, reason=exit_.reason, message=exit_.message)

    def adopt(self, launcher: SimLauncher, worker_id: str) -> WorkerExit | None:
        """The launcher owns the worker from now on; its exit if it has exited already."""
        remote = self.live.get(worker_id)
        if remote is not None:
            self.attach(launcher)
            remote.owners.add(launcher)
        return self.done.get(worker_id)

    def command(self, action: str, run_ids: set[str] | None) -> int:
        self.out.send({"op": "command", "action": action, "run_ids": None if run_ids is None else sorted(run_ids)})
        return sum(1 for r in self.live.values() if run_ids is None or r.run_id in run_ids)

    async def request(self, op: str, **fields: Any) -> Any:
        if not self.alive:
            raise FleetGone
        rid = next(self._ids)
        reply: asyncio.Future[Any] = self.loop.create_future()
        self._replies[rid] = reply
        self.out.send({"op": op, "id": rid, **fields})
        try:
            return await reply
        finally:
            self._replies.pop(rid, None)

    async def release(self, launcher: SimLauncher) -> None:
        """A launcher closes: the workers only it owned end with it, and the process with the last."""
        orphans = []
        for wid, remote in list(self.live.items()):
            remote.owners.discard(launcher)
            if not remote.owners:
                orphans.append(wid)
                self._forget(wid)
        self.users.pop(launcher, None)
        if not self.users:
            await self.stop()
        elif orphans:
            with contextlib.suppress(FleetGone):
                await self.request("stop", worker_ids=orphans)

    async def stop(self) -> None:
        """Every worker stops, then the process exits (killed if it does not)."""
        self.closing = True
        if self.alive:
            with contextlib.suppress(FleetGone, TimeoutError):
                await asyncio.wait_for(self.request("close"), CLOSE_SECONDS)
        self.writer.close()
        await self._ended()
        with contextlib.suppress(BaseException):
            await self._reading

    # --- what the fleet says ------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await read_frame(reader)) is not None:
                for message in frame:
                    self._dispatch(message)
        except Exception:
            log.exception("sim: fleet %s (process %d): unreadable message; the fleet is given up", self.id, self.pid)
            self.writer.close()  # the fleet process sees its socket close and exits
        await self._lost()

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "exit":
            self._exited(message["worker_id"], exit_from_wire(message["exit"]), message.get("log"))
        elif op == "reply":
            reply = self._replies.get(message["id"])
            if reply is not None and not reply.done():
                reply.set_result(message.get("value"))
        elif op == "lag":
            self._lag.observe(message["seconds"])
        elif op == "gc":
            for generation, seconds in message["pauses"]:
                metrics.GC_PAUSE.labels("sim-fleet", generation).observe(seconds)

    def _exited(self, worker_id: str, exit_: WorkerExit, log: str | None = None) -> None:
        remote = self._forget(worker_id)
        self.done[worker_id] = exit_
        if log is not None:
            _keep_log(worker_id, log)
        while len(self.done) > MAX_EXITS_KEPT:
            self.done.popitem(last=False)
        for owner in list(remote.owners if remote is not None else ()):
            owner.deliver(exit_)

    def _forget(self, worker_id: str) -> Remote | None:
        remote = self.live.pop(worker_id, None)
        if remote is not None:
            self.by_attempt.pop((remote.run_id, remote.attempt), None)
        return remote

    async def _lost(self) -> None:
        """The fleet's end of the socket closed: the process is gone (or about to be made so), and
        with it every worker it hosted. None may be left running as far as runherd knows."""
        self.alive = False
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(FleetGone())
        code = await self._ended()
        if self.closing:
            return
        gone = list(self.live)
        log.error(
            "sim: the fleet process %d (fleet %s) exited unexpectedly (%s); its %d live virtual workers "
            "are reported exited",
            self.pid,
            self.id,
            _exit_status(code),
            len(gone),
        )
        message = f"its sim fleet process ({self.pid}) is gone: {_exit_status(code)}"
        for wid in gone:
            remote = self.live[wid]
            self._exited(wid, WorkerExit(remote.run_id, remote.attempt, None, reason="exited", message=message))

    async def _ended(self) -> int | None:
        """The process's exit status, once it has exited: killed first when its socket closed but
        it still runs, so that a worker reported gone is gone."""
        try:
            return await asyncio.wait_for(self.proc.wait(), EXIT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return await self.proc.wait()


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


_CURRENT: FleetProcess | None = None
_STARTING: asyncio.Task[FleetProcess] | None = None


def current() -> FleetProcess | None:
    """The live fleet process of this loop, if one was started (and is not being stopped: a launch
    then starts another)."""
    found = _CURRENT
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return found if found is not None and found.alive and not found.closing and found.loop is loop else None


async def shared() -> FleetProcess:
    """The fleet process of this loop, started on first use (concurrent launches share the start)."""
    global _STARTING
    found = current()
    if found is not None:
        return found
    loop = asyncio.get_running_loop()
    if _STARTING is None or _STARTING.get_loop() is not loop:
        _abandon(_CURRENT)
        _STARTING = loop.create_task(_start())
    await asyncio.shield(_STARTING)
    found = current()
    if found is None:
        raise LaunchError("sim: the fleet process exited as it started (see the launcher's log)")
    return found


async def _start() -> FleetProcess:
    global _CURRENT, _STARTING
    try:
        _CURRENT = await FleetProcess.start()
        return _CURRENT
    finally:
        _STARTING = None


def _abandon(old: FleetProcess | None) -> None:
    """A fleet process left by another loop (its launchers never closed): killed."""
    if old is None or old.loop is asyncio.get_running_loop():
        return  # gone, or being closed by this loop's launchers
    if old.alive and start_time(old.pid) == old.started:
        log.warning("sim: fleet process %d was left by another event loop; killed", old.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid, signal.SIGKILL)


# --- the fleet's side (the child process) ------------------------------------------------------


class Host:
    """The fleet process: carries out the launcher's messages on the fleet, sends its exits."""

    def __init__(self, fleet_id: str, writer: asyncio.StreamWriter) -> None:
        from runherd.launchers import sim

        self.sim = sim
        loop = asyncio.get_running_loop()
        self.out = Outbox(writer, loop)
        self.fleet: Fleet = sim.Fleet(fleet_id, loop=loop, on_exit=self._exited)
        self.configs: dict[int, SimConfig] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "configure": self._configure,
            "launch": self._launch,
            "terminate": self._terminate,
            "debug": self._debug,
            "command": self._command,
            "stop": self._stop,
        }
        # Kept by the collector's hook, sent with the next loop-lag sample: a frame sent from
        # inside a collection could interrupt the outbox in the middle of its own writing.
        self.gc_pauses: list[tuple[str, float]] = []

    async def serve(self, reader: asyncio.StreamReader) -> None:
        lag = asyncio.ensure_future(watch_loop_lag("sim-fleet", observe=self._lag))
        watch_gc_pauses(observe=lambda generation, seconds: self.gc_pauses.append((generation, seconds)))
        try:
            while (frame := await read_frame(reader)) is not None:
                for message in frame:
                    if message["op"] == "close":
                        await self._close(message)
                        # The workers are stopped: nothing is left for a graceful shutdown of the
                        # loop to wait for but cancelled broker reconnects.
                        os._exit(0)
                    self.handlers[message["op"]](message)
        finally:
            lag.cancel()
        # The launcher is gone without closing (killed): so is its fleet, as it would be in its process.
        live = len(self.fleet.live)
        log.error("sim fleet %s: the launcher's socket closed; exiting with its %d workers", self.fleet.id, live)
        os._exit(1)

    def _reply(self, message: dict[str, Any], value: Any) -> None:
        self.out.send({"op": "reply", "id": message["id"], "value": value})

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _lag(self, seconds: float) -> None:
        self.out.send({"op": "lag", "seconds": seconds})
        if self.gc_pauses:
            pauses, self.gc_pauses = self.gc_pauses, []
            self.out.send({"op": "gc", "pauses": pauses})

    def _exited(self, worker: VirtualWorker) -> None:
        assert worker.exit is not None
        self.out.send(
            {
                "op": "exit",
                "worker_id": worker.plan.worker_id,
                "exit": to_wire(worker.exit),
                "log": worker.log(),
            }
        )

    def _configure(self, message: dict[str, Any]) -> None:
        cfg = self.configs[message["cfg"]] = self.sim.SimConfig(**message["config"])
        self.sim.configure_fleet(self.fleet, cfg)

    def _launch(self, message: dict[str, Any]) -> None:
        run = run_from_wire(message["run"])
        try:
            plan, script, _ = self.sim.prepare(run, message["worker_id"])
        except LaunchError as exc:  # the launcher checked it first: only a bug gets here
            worker_exit = WorkerExit(run.run_id, run.attempt, self.sim.EXIT_REPORT_FAILED, message=str(exc))
            self.out.send({"op": "exit", "worker_id": message["worker_id"], "exit": to_wire(worker_exit)})
            return
        self.fleet.add(run, plan, message["handle"], script, self.configs[message["cfg"]]).start()

    def _terminate(self, message: dict[str, Any]) -> None:
        worker = self.fleet.find({"worker_id": message["worker_id"]})
        if worker is None or worker.exit is not None:
            self._reply(message, False)
            return

        async def terminate(worker: VirtualWorker) -> None:
            await worker.terminate(message["grace"])
            self._reply(message, True)

        self._later(terminate(worker))

    def _debug(self, message: dict[str, Any]) -> None:
        worker = self.fleet.find({"worker_id": message["worker_id"]})
        self._reply(message, None if worker is None else worker.log())

    def _command(self, message: dict[str, Any]) -> None:
        run_ids = message.get("run_ids")
        self.fleet.command(message["action"], None if run_ids is None else set(run_ids))

    def _stop(self, message: dict[str, Any]) -> None:
        workers = [w for w in (self.fleet.live.get(wid) for wid in message["worker_ids"]) if w is not None]

        async def stop() -> None:
            await self.sim.stop_workers(self.fleet, workers)
            self._reply(message, None)

        self._later(stop())

    async def _close(self, message: dict[str, Any]) -> None:
        await self.sim.stop_workers(self.fleet, list(self.fleet.live.values()))
        self._reply(message, None)
        self.out.flush()
        await self.out.writer.drain()


async def _serve(fd: int, fleet_id: str) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    await Host(fleet_id, writer).serve(reader)


def main(argv: list[str] | None = None) -> None:
    from runherd.runtime import run_loop

    parser = argparse.ArgumentParser(prog="python -m runherd.launchers.sim_host")
    parser.add_argument("--fd", type=int, required=True, help="this end of the launcher's socketpair")
    parser.add_argument("--fleet", required=True, help="the fleet id the launcher's handles name")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s [sim fleet {args.fleet}, pid %(process)d]: %(message)s",
    )
    # Ctrl-C in a terminal reaches the whole process group: the launcher stops its fleet itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_loop(_serve(args.fd, args.fleet))


if __name__ == "__main__":
    main()
