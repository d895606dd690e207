"""The sim launcher: thousands of virtual workers as asyncio tasks in one process, to load-test a
deployment before pointing it at real workers.

A virtual worker speaks the real worker protocol through the worker's own code
(``runherd.reporting.Reporter``): heartbeats every ``heartbeat_interval_seconds``, lifecycle events
numbered per attempt, and the plan with its completed steps (a resumed attempt skips them). Each
step takes ``step_seconds`` instead of running its command. A worker succeeds, fails a step,
crashes (stops at once and is reported as exited, like a SIGKILLed process) or hangs (stops
heartbeating and progressing, and ignores a polite stop for ``terminate_grace_seconds``):

* at a configured rate: ``step_failure_rate``, ``crash_rate``, ``hang_rate`` (the chance per step);
* per run, from its launch's ``env``: ``RUNHERD_SIM_OUTCOME`` = succeed | fail | crash | hang | wait,
  what becomes of the attempt's last step (wait: it lasts until a command, so a resumed attempt
  reuses the steps before it and waits again), ``RUNHERD_SIM_STEP_SECONDS``,
  ``RUNHERD_SIM_EXIT_CODE`` (a crash's exit code; default: killed by SIGKILL), ``RUNHERD_SIM_SAY``
  (a line the worker writes to its log, which ``debug_info`` shows);
* on command: a message ``{"v": 1, "action": "succeed" | "fail" | "crash" | "hang", "run_ids": [...]}``
  (no ``run_ids``: every live worker) on the fanout exchange ``runherd.sim`` (see ``command_body``),
  or ``SimLauncher.command`` in the same process.

Connections: by default each virtual worker opens its own RabbitMQ connection, as a real worker
does, so a load test pays the broker's real cost. ``workers_per_connection: N`` makes up to N
workers share one connection, each on a channel of its own (what workers on one host could do).

The workers live in the launcher service's process, or in a child process of it with
``fleet_process: true``: a handle names that process (``fleet``, its pid and start time), only the
launcher service can reach them (a monitor elsewhere sends the ``kill`` request, as for another
host's workers), and when the process is gone so are they (``check_health`` says NOT_FOUND, ``adopt``
reports them exited; a fleet process that dies has its live workers reported exited through
``watch()`` at once).

By default the fleet runs on an event loop of its own, in a thread of that process
(``runherd-sim-fleet``). Thousands of workers make thousands of callbacks per loop iteration (10,000
workers publish 2,000 heartbeats a second); on the launcher's loop every await of the launch path
would wait behind them (the timer lag measured 0.25 s to 2 s at 5,000 workers), and the launch rate
would fall as the fleet grew. Everything that touches a worker's asyncio state runs on the fleet's
loop; the launcher's loop hears exits through its own queue. On its own loop the fleet still shares
the interpreter (the GIL): at 10,000 workers the launcher's intake of a launch storm took 18.7 s
instead of 0.08 s. ``fleet_process: true`` moves the fleet (the same ``Fleet``, ``VirtualWorker`` and
``Connections``) to a child process, ``runherd.launchers.sim_host``, which the first launch starts and
``close`` stops; the launcher talks to it over a socketpair (see that module).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from runherd.broker import Broker
from runherd.errors import ConfigError, InvalidMessage, LaunchError
from runherd.launchers import sim_host
from runherd.launchers.base import Handle, Health, HealthStatus, RunLauncher, WorkerExit, WorkerRun
from runherd.launchers.process import start_time
from runherd.launchers.sim_host import FleetGone, FleetProcess, exited_log
from runherd.plan import Plan, from_json, ready
from runherd.probes import watch_loop_lag
from runherd.reporting import HeartbeatSink, Reporter

log = logging.getLogger("runherd.launchers.sim")
T = TypeVar("T")

CONTROL_EXCHANGE = "runherd.sim"
ACTIONS = ("succeed", "fail", "crash", "hang")
OUTCOMES = ("succeed", "fail", "crash", "hang", "wait")
_KEYS = {
    "step_seconds",
    "workers_per_connection",
    "step_failure_rate",
    "crash_rate",
    "hang_rate",
    "seed",
    "terminate_grace_seconds",
    "amqp_url",
    "fleet_process",
}
EXIT_FAILURE = 1  # the real worker's codes
EXIT_REPORT_FAILED = 3
EXIT_CANCELED = 143
SIGKILL = 9
MAX_EXITS_KEPT = 20_000
LOG_LINES = 40
CONNECT_TRIES = 4
# Workers opening their connection or channel at once. A storm hands the fleet hundreds of launches
# in one go (a fleet process gets them in batches); opened all at once, the handshakes and channel
# opens queue behind each other past RabbitMQ's 10 s handshake timeout, connections are reset, and
# every worker on them goes silent. Bounded, a storm's workers connect at the broker's pace. (48 at
# once was slower than 16 in the 10,000-run benchmark: 192 s to all STARTED against 112 s.)
OPENING_AT_ONCE = 16
CONNECT_BACKOFF_SECONDS = 2.0


def command_body(action: str, run_ids: Iterable[str] | None = None) -> bytes:
    """A control message for the ``runherd.sim`` exchange."""
    if action not in ACTIONS:
        raise InvalidMessage(f"sim: action: expected one of {', '.join(ACTIONS)}")
    body: dict[str, Any] = {"v": 1, "action": action}
    if run_ids is not None:
        body["run_ids"] = list(run_ids)
    return orjson.dumps(body)


def parse_command(data: Any) -> tuple[str, set[str] | None]:
    if not isinstance(data, dict) or data.get("v") != 1:
        raise InvalidMessage('sim: expected an object with "v": 1')
    action, run_ids = data.get("action"), data.get("run_ids")
    if action not in ACTIONS:
        raise InvalidMessage(f"sim: action: expected one of {', '.join(ACTIONS)}")
    if run_ids is not None and (not isinstance(run_ids, list) or not all(isinstance(r, str) for r in run_ids)):
        raise InvalidMessage("sim: run_ids: expected a list of run ids")
    return action, None if run_ids is None else set(run_ids)


@dataclass(frozen=True)
class SimConfig:
    step_seconds: float = 1.0
    workers_per_connection: int = 1
    step_failure_rate: float = 0.0
    crash_rate: float = 0.0
    hang_rate: float = 0.0
    seed: int | None = None
    terminate_grace_seconds: float = 10.0
    amqp_url: str | None = None  # default: the worker's broker URL, from its plan
    fleet_process: bool = False  # the fleet in a child process (runherd.launchers.sim_host)


def parse_config(raw: Mapping[str, Any]) -> SimConfig:
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(
            f"run_launcher.config.{sorted(unknown)[0]}: unknown key for the sim launcher "
            f"(known: {', '.join(sorted(_KEYS))})"
        )

    def number(key: str, default: float, low: float = 0.0, high: float | None = None) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low or (high and value > high):
            bound = f"between {low:g} and {high:g}" if high else f">= {low:g}"
            raise ConfigError(f"run_launcher.config.{key}: expected a number {bound}")
        return float(value)

    per_connection = raw.get("workers_per_connection", 1)
    if isinstance(per_connection, bool) or not isinstance(per_connection, int) or not 1 <= per_connection <= 2000:
        raise ConfigError("run_launcher.config.workers_per_connection: expected an integer from 1 to 2000")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError("run_launcher.config.seed: expected an integer")
    url = raw.get("amqp_url")
    if url is not None and not isinstance(url, str):
        raise ConfigError("run_launcher.config.amqp_url: expected a string")
    in_process = raw.get("fleet_process", False)
    if not isinstance(in_process, bool):
        raise ConfigError("run_launcher.config.fleet_process: expected true or false")
    return SimConfig(
        step_seconds=number("step_seconds", 1.0),
        workers_per_connection=per_connection,
        step_failure_rate=number("step_failure_rate", 0.0, high=1.0),
        crash_rate=number("crash_rate", 0.0, high=1.0),
        hang_rate=number("hang_rate", 0.0, high=1.0),
        seed=seed,
        terminate_grace_seconds=number("terminate_grace_seconds", 10.0),
        amqp_url=url,
        fleet_process=in_process,
    )


@dataclass(frozen=True)
class Directives:
    """One run's script, from its env."""

    outcome: str | None = None
    step_seconds: float | None = None
    exit_code: int | None = None
    say: str | None = None


def directives(env: Mapping[str, str]) -> Directives:
    outcome = env.get("RUNHERD_SIM_OUTCOME") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidMessage(f"RUNHERD_SIM_OUTCOME: expected one of {', '.join(OUTCOMES)}")
    try:
        seconds = float(env["RUNHERD_SIM_STEP_SECONDS"]) if env.get("RUNHERD_SIM_STEP_SECONDS") else None
        code = int(env["RUNHERD_SIM_EXIT_CODE"]) if env.get("RUNHERD_SIM_EXIT_CODE") else None
    except ValueError as exc:
        raise InvalidMessage(f"RUNHERD_SIM_*: {exc}") from None
    return Directives(outcome, seconds, code, env.get("RUNHERD_SIM_SAY") or None)


def fate(cfg: SimConfig, rand: float) -> str | None:
    """Pure: what the configured rates make of one step, from one uniform draw in [0, 1)."""
    edge = 0.0
    for name, chance in (("crash", cfg.crash_rate), ("hang", cfg.hang_rate), ("fail", cfg.step_failure_rate)):
        edge += chance
        if rand < edge:
            return name
    return None


def killed_exit(run_id: str, attempt: int, code: int | None) -> WorkerExit:
    if code is None:
        return WorkerExit(run_id, attempt, 128 + SIGKILL, SIGKILL, "SIGKILL", "worker killed by signal 9 (SIGKILL)")
    return WorkerExit(run_id, attempt, code, None, None, f"worker exited with code {code}")


# --- connections -------------------------------------------------------------------------------


@dataclass
class _Connection:
    ready: asyncio.Task[Broker]
    live: int = 0
    beats: asyncio.Task[Broker] | None = None  # the workers' shared heartbeat channel

    async def heartbeat_channel(self) -> Broker:
        """One channel without publisher confirms carries the heartbeats of every worker on this
        connection (each still signed with its own token): no confirm frame comes back per
        heartbeat, which at 2,000 heartbeats a second was most of the fleet's CPU. Opened again if
        it failed or was closed."""
        if self.beats is None or (
            self.beats.done() and (self.beats.exception() is not None or self.beats.result().channel.is_closed)
        ):
            self.beats = asyncio.ensure_future(_beats_channel(self.ready))
        return await asyncio.shield(self.beats)

    async def publish_heartbeat(self, body: bytes, *, token: str | None = None) -> None:
        await (await self.heartbeat_channel()).send_heartbeat(body, token=token)


async def _beats_channel(ready: asyncio.Task[Broker]) -> Broker:
    return await (await asyncio.shield(ready)).sibling(confirms=False)


class Connections:
    """Each worker a connection of its own, or up to N workers on one connection (a channel each)."""

    def __init__(self, per_connection: int) -> None:
        self.per_connection = per_connection
        self._open: dict[str, list[_Connection]] = {}
        self._opening = asyncio.Semaphore(OPENING_AT_ONCE)

    async def channel(self, url: str) -> tuple[Broker, HeartbeatSink, Callable[[], Awaitable[None]]]:
        """(the worker's events channel, its heartbeats channel, what releases both). A connection
        that fails to open is tried again, a few times over about 30 s: on a loaded load-test host
        a handshake can miss RabbitMQ's 10 s timeout, and one failed connection would otherwise fail
        every worker that was to share it."""
        for try_ in range(1, CONNECT_TRIES + 1):
            try:
                async with self._opening:
                    return await self._channel(url)
            except Exception:  # BrokerError, or a channel that could not be opened
                if try_ == CONNECT_TRIES:
                    raise
                await asyncio.sleep(CONNECT_BACKOFF_SECONDS * try_)
        raise AssertionError("unreachable")

    async def _channel(self, url: str) -> tuple[Broker, HeartbeatSink, Callable[[], Awaitable[None]]]:
        if self.per_connection == 1:
            broker = await Broker.connect(url, declare=False)
            return broker, broker, broker.close
        pool = self._open.setdefault(url, [])
        entry = next((c for c in pool if c.live < self.per_connection), None)
        if entry is None:  # chosen without awaiting: concurrent launches fill one connection
            entry = _Connection(asyncio.ensure_future(Broker.connect(url, declare=False)))
            # The heartbeat channel first: channels of a connection open one after the other, and
            # opened lazily it would wait behind the channels of every worker launched with this
            # one (50 opens, two round trips each), while the first of them already reports
            # RUN_START and is taken for hung when no heartbeat follows within the timeout.
            entry.beats = asyncio.ensure_future(_beats_channel(entry.ready))
            pool.append(entry)
        entry.live += 1
        try:
            base = await asyncio.shield(entry.ready)
            broker = await base.sibling()
        except BaseException:
            if entry.ready.done() and not entry.ready.cancelled() and entry.ready.exception() is not None:
                with contextlib.suppress(ValueError):  # a failed connection takes no more workers
                    pool.remove(entry)
            await self._release(url, entry)
            raise

        async def release() -> None:
            await broker.close_channel()
            await self._release(url, entry)

        return broker, entry, release

    async def _release(self, url: str, entry: _Connection) -> None:
        entry.live -= 1
        pool = self._open.get(url, [])
        if entry.live == 0 and entry in pool:
            pool.remove(entry)
            if entry.ready.done() and not entry.ready.cancelled() and entry.ready.exception() is None:
                await entry.ready.result().close()

    def count(self) -> int:
        return sum(len(p) for p in self._open.values())


# --- one virtual worker ------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside a worker's life to end it: ``code`` None means killed (SIGKILL)."""

    def __init__(self, code: int | None, *, hang: bool = False) -> None:
        self.code = code
        self.hang = hang


@dataclass
class VirtualWorker:
    fleet: Fleet
    run: WorkerRun
    plan: Plan
    handle: Handle
    script: Directives
    cfg: SimConfig
    owners: set[SimLauncher] = field(default_factory=set)
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    pending: list[str] = field(default_factory=list)
    poked: asyncio.Event = field(default_factory=asyncio.Event)
    hung: bool = False
    exit: WorkerExit | None = None
    task: asyncio.Task[None] | None = None
    killing: tuple[int | None] | None = None  # set to kill it (with this exit code; None: SIGKILL)
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, line: str) -> None:
        self.lines.append(line)

    def log(self) -> str:
        """What the worker noted, oldest first: its debug info."""
        return "\n".join(self.lines)

    def start(self) -> None:
        """On the fleet's loop: the worker's life begins."""
        if self.exit is None and self.task is None:
            self.task = asyncio.ensure_future(self.live())

    async def terminate(self, grace: float) -> None:
        """On the fleet's loop: a polite stop, then a kill once ``grace`` is over."""
        if grace > 0:
            self.command("terminate")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gone.wait(), grace)
        self.kill()

    def command(self, action: str) -> None:
        if self.exit is not None or self.hung:
            return
        if action in ("crash", "kill"):
            self.kill(self.script.exit_code if action == "crash" else None)
            return
        self.pending.append(action)
        self.poked.set()

    def kill(self, code: int | None = None) -> None:
        """Stops like a SIGKILLed process (or a crash with ``code``): no event more, no heartbeat
        more. It takes effect once the publish in flight (if any) is done, never by cancelling a
        broker call midway (a channel left half-open would break the connection it shares)."""
        if self.exit is not None:
            return
        if self.hung or self.task is None or self.task.done():
            self._exited(killed_exit(self.run.run_id, self.run.attempt, code))
            return
        if self.killing is None:
            self.killing = (code,)
            self.poked.set()

    def check(self) -> None:
        if self.killing is not None:
            raise _Stop(self.killing[0])

    async def live(self) -> None:
        try:
            await self._live()
        except _Stop as stop:
            if stop.hang:
                self.hung = True
                self.note("hung: no more heartbeats or progress")
                return
            self._exited(killed_exit(self.run.run_id, self.run.attempt, stop.code))

    async def _live(self) -> None:
        # The worker's broker URL travels in its plan (runherd.plan), as for a real worker.
        url = self.cfg.amqp_url or self.plan.amqp_url or self.run.env.get("RUNHERD_AMQP_URL")
        if not url:
            self.note("no broker URL in the worker's plan")
            self._exited(WorkerExit(self.run.run_id, self.run.attempt, EXIT_REPORT_FAILED, message="no broker"))
            return
        try:
            broker, beats_channel, release = await self.fleet.connections.channel(url)
        except Exception as exc:  # as a real worker that cannot reach the broker: exit code 3
            self.note(f"cannot connect: {exc}")
            self._exited(WorkerExit(self.run.run_id, self.run.attempt, EXIT_REPORT_FAILED, message=str(exc)))
            return
        reporter = Reporter(broker, self.plan, quiet=True, beats=beats_channel)
        silent = asyncio.Event()
        beats = asyncio.ensure_future(reporter.heartbeats(silent))
        try:
            self.check()
            code = await self._work(reporter)
        except _Stop as stop:
            silent.set()
            if not stop.hang:
                # A killed process's exit is seen at once (a pidfd): the exit is reported before
                # the channel is closed, which under load takes round trips of a busy loop.
                self._exited(killed_exit(self.run.run_id, self.run.attempt, stop.code))
            raise
        finally:
            silent.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(beats)
            await asyncio.shield(release())
        self._exited(WorkerExit(self.run.run_id, self.run.attempt, code, message=f"worker exited with code {code}"))

    async def _work(self, reporter: Reporter) -> int:
        if self.script.say:
            self.note(self.script.say)
        await reporter.run_start(os.getpid(), what=f"virtual worker {self.plan.worker_id} in sim fleet")
        self.check()
        self.note(f"run {self.run.run_id} attempt {self.run.attempt}: started")
        done: set[str] = set(self.plan.completed)
        started: set[str] = set()
        quick = False
        if self.script.outcome == "wait" and not ready(self.plan.steps, done, started):
            # Nothing left to run: a waiting worker still waits for its command.
            action = await self._wait(None)
            self.check()
            code = await self._act(reporter, action, None)
            if code is not None:
                return code
        while True:
            steps = ready(self.plan.steps, done, started)
            if not steps:
                break
            for step in steps:
                started.add(step.key)
                await reporter.step_start(step.key)
                self.check()
                last = len(started | done) == len(self.plan.steps)
                planned = (self.script.outcome if last else None) or fate(self.cfg, self.fleet.rng.random())
                seconds = self.script.step_seconds if self.script.step_seconds is not None else self.cfg.step_seconds
                action = await self._wait(None if planned == "wait" else (0.0 if quick else seconds))
                self.check()
                action = action or (planned if planned not in ("wait", "succeed") else None)
                quick = quick or action == "succeed"
                code = await self._act(reporter, action, step.key)
                if code is not None:
                    return code
                await reporter.step_success(step.key, None)
                done.add(step.key)
                self.check()
        if "terminate" in self.pending:
            await reporter.run_canceled()
            return EXIT_CANCELED
        if self.script.exit_code not in (None, 0):
            self.note(f"exiting with code {self.script.exit_code}")
            raise _Stop(self.script.exit_code)
        await reporter.run_success()
        self.note("succeeded")
        return 0

    async def _act(self, reporter: Reporter, action: str | None, key: str | None) -> int | None:
        """Carries out a command (or a planned fate) in step ``key``; an exit code ends the worker."""
        if action == "fail":
            failed = key or "(none)"
            if key is not None:
                await reporter.step_failure(key, "simulated step failure")
            await reporter.run_failure({failed: "simulated step failure"})
            self.note(f"step {failed} failed")
            return EXIT_FAILURE
        if action == "crash":
            self.note(f"crashed in step {key or '-'}")
            raise _Stop(self.script.exit_code)
        if action == "hang":
            raise _Stop(None, hang=True)
        if action == "terminate":
            await reporter.run_canceled()
            self.note("stopped on request")
            return EXIT_CANCELED
        return None

    async def _wait(self, seconds: float | None) -> str | None:
        """Wait the step out, or less when a command comes; returns the command."""
        if not self.pending and self.killing is None and seconds != 0:
            self.poked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.poked.wait(), seconds)
        return self.pending.pop(0) if self.pending else None

    def _exited(self, exit_: WorkerExit) -> None:
        if self.exit is not None:
            return
        self.exit = exit_
        self.note(exit_.message or "exited")
        self.fleet.exited(self)
        self.gone.set()


# --- the process's fleet -----------------------------------------------------------------------


class Fleet:
    """Every virtual worker of this process, whichever launcher instance started it.

    In the launcher's process its loop is a thread's (``loop``) and an exit goes to the launchers
    that own the worker; in a fleet process (``sim_host``) it is that process's running loop and an
    exit goes to ``on_exit``, which sends it to the launcher."""

    def __init__(
        self,
        fleet_id: str | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        on_exit: Callable[[VirtualWorker], None] | None = None,
    ) -> None:
        self.id = fleet_id or uuid.uuid4().hex[:12]
        self.pid = os.getpid()
        self.started = start_time(self.pid)
        self.host = socket.gethostname()
        self.live: dict[str, VirtualWorker] = {}  # worker_id -> worker
        self.by_attempt: dict[tuple[str, int], VirtualWorker] = {}
        self.done: OrderedDict[str, VirtualWorker] = OrderedDict()
        self.rng = random.Random()
        self.connections = Connections(1)
        self._loop = loop
        self._lock = threading.Lock()
        self.on_exit = on_exit

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The fleet's own event loop, started (in a daemon thread) on first use."""
        with self._lock:
            if self._loop is None:
                self._loop = _start_loop_thread()
            return self._loop

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the fleet's loop, from any thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the fleet's loop, from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def exited(self, worker: VirtualWorker) -> None:
        wid = worker.plan.worker_id
        self.live.pop(wid, None)
        self.by_attempt.pop((worker.run.run_id, worker.run.attempt), None)
        self.done[wid] = worker
        while len(self.done) > MAX_EXITS_KEPT:
            self.done.popitem(last=False)
        assert worker.exit is not None
        for owner in list(worker.owners):  # a copy: launchers on another thread add themselves
            owner.deliver(worker.exit)
        if self.on_exit is not None:
            self.on_exit(worker)

    def find(self, handle: Handle) -> VirtualWorker | None:
        wid = str(handle.get("worker_id"))
        return self.live.get(wid) or self.done.get(wid)

    def add(
        self,
        run: WorkerRun,
        plan: Plan,
        handle: Handle,
        script: Directives,
        cfg: SimConfig,
        owners: Iterable[SimLauncher] = (),
    ) -> VirtualWorker:
        """A new worker, live from now on; ``start`` begins its life (on the fleet's loop)."""
        worker = VirtualWorker(self, run, plan, handle, script, cfg, owners=set(owners))
        self.live[plan.worker_id] = worker
        self.by_attempt[(run.run_id, run.attempt)] = worker
        return worker

    def command(self, action: str, run_ids: set[str] | None) -> int:
        targets = [w for w in list(self.live.values()) if run_ids is None or w.run.run_id in run_ids]
        self.soon(_command_all, targets, action)
        return len(targets)


def _command_all(workers: list[VirtualWorker], action: str) -> None:
    for worker in workers:
        worker.command(action)


def _start_loop_thread() -> asyncio.AbstractEventLoop:
    """A new event loop (uvloop when the service runs on it) serving forever in a daemon thread."""
    if os.environ.get("RUNHERD_EVENT_LOOP", "").strip().lower() == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    running = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(running.set)
        # The fleet's own lag, beside the service's (runherd_event_loop_lag_seconds{loop="sim-fleet"}):
        # a fleet that cannot keep its heartbeats on time makes its workers look hung.
        lag = loop.create_task(watch_loop_lag("sim-fleet"))
        loop.run_forever()
        lag.cancel()

    threading.Thread(target=serve, name="runherd-sim-fleet", daemon=True).start()
    running.wait()
    return loop


_FLEET: Fleet | None = None


def fleet() -> Fleet:
    global _FLEET
    if _FLEET is None or _FLEET.pid != os.getpid():
        _FLEET = Fleet()
    return _FLEET


def configure_fleet(where: Fleet, cfg: SimConfig) -> None:
    """A launcher's fleet-wide settings: the rates' seed, and how workers share connections (which
    changes only while no worker lives)."""
    if cfg.seed is not None:
        where.rng.seed(cfg.seed)
    if cfg.workers_per_connection != where.connections.per_connection and not where.live:
        where.connections = Connections(cfg.workers_per_connection)


def prepare(run: WorkerRun, worker_id: str | None = None) -> tuple[Plan, Directives, str]:
    """A launch's plan (with its worker id), its script and its worker id; LaunchError if bad."""
    try:
        script = directives(run.env)
        plan = (
            from_json(run.plan)
            if run.plan
            else Plan(run_id=run.run_id, attempt=run.attempt, job=run.job, steps=(), worker_id=run.worker_id)
        )
    except (InvalidMessage, KeyError, TypeError, ValueError) as exc:
        raise LaunchError(f"sim: {exc}") from exc
    worker_id = worker_id or plan.worker_id or run.worker_id or uuid.uuid4().hex[:12]
    if plan.worker_id != worker_id:
        plan = dataclasses.replace(plan, worker_id=worker_id)
    return plan, script, worker_id


async def stop_workers(where: Fleet, workers: list[VirtualWorker]) -> None:
    """On the fleet's loop: the workers of a launcher that closes end with it (its process would),
    and are forgotten (no exit is reported: nobody is left to hear it)."""
    tasks = [w.task for w in workers if w.task is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for worker in workers:
        where.live.pop(worker.plan.worker_id, None)
        where.by_attempt.pop((worker.run.run_id, worker.run.attempt), None)


def _fleet_alive(handle: Handle) -> bool:
    pid = handle.get("fleet_pid")
    return isinstance(pid, int) and start_time(pid) is not None and start_time(pid) == handle.get("fleet_started")


def _handle(where: Fleet | FleetProcess, worker_id: str, run: WorkerRun) -> Handle:
    """It names the process that hosts the worker: only that process can reach it."""
    return {
        "launcher": SimLauncher.name,
        "host": where.host,
        "fleet": where.id,
        "fleet_pid": where.pid,
        "fleet_started": where.started,
        "worker_id": worker_id,
        "run_id": run.run_id,
        "attempt": run.attempt,
    }


def _gone_exit(handle: Handle) -> WorkerExit:
    return WorkerExit(
        str(handle.get("run_id")),
        int(handle.get("attempt") or 0),
        None,
        reason="exited",
        message="its sim fleet (the process that hosted it) is gone",
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class SimLauncher(RunLauncher):
    name = "sim"
    hosts_workers_in_process = True

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.cfg = parse_config(self.config)
        self.hostname = socket.gethostname()
        # The thread fleet is this process's; a fleet process is started by the first launch.
        self.fleet = fleet()
        if not self.cfg.fleet_process:
            configure_fleet(self.fleet, self.cfg)
        self.exits: asyncio.Queue[WorkerExit] = asyncio.Queue()
        self._home: asyncio.AbstractEventLoop | None = None  # the loop that reads ``exits``
        self._control: asyncio.Task[None] | None = None
        self._process: FleetProcess | None = None  # the fleet process it launched into or adopted from

    def deliver(self, exit_: WorkerExit) -> None:
        """An exit for ``watch()``, on this launcher's own loop: from the fleet's thread, or from
        the reader of the fleet process (on this loop)."""
        home = self._home
        if home is None or home.is_closed():
            return
        if _running_loop() is home:
            self.exits.put_nowait(exit_)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is watching
            home.call_soon_threadsafe(self.exits.put_nowait, exit_)

    def _where(self, handle: Handle) -> Fleet | FleetProcess | None:
        """The fleet of this process that hosts the handle's worker, if any."""
        if not self.cfg.fleet_process:
            return self.fleet if handle.get("fleet") == self.fleet.id else None
        process = sim_host.current()
        return process if process is not None and handle.get("fleet") == process.id else None

    # --- the interface ---------------------------------------------------------------------

    async def launch(self, run: WorkerRun) -> Handle:
        self._home = asyncio.get_running_loop()
        if self.cfg.fleet_process:
            return await self._launch_into_process(run)
        existing = self.fleet.by_attempt.get((run.run_id, run.attempt))
        if existing is not None:  # a second claim of one attempt adopts its worker
            existing.owners.add(self)
            return existing.handle
        plan, script, worker_id = prepare(run)
        self._follow_commands(self.cfg.amqp_url or plan.amqp_url or run.env.get("RUNHERD_AMQP_URL"))
        handle = _handle(self.fleet, worker_id, run)
        worker = self.fleet.add(run, plan, handle, script, self.cfg, owners={self})
        self.fleet.soon(worker.start)
        return handle

    async def _launch_into_process(self, run: WorkerRun) -> Handle:
        """No round trip: the handle is made here and the launch sent with this loop iteration's."""
        process = self._process = await sim_host.shared()
        existing = process.by_attempt.get((run.run_id, run.attempt))
        if existing is not None:  # a second claim of one attempt adopts its worker
            process.attach(self)
            existing.owners.add(self)
            return existing.handle
        plan, _, worker_id = prepare(run)
        self._follow_commands(self.cfg.amqp_url or plan.amqp_url or run.env.get("RUNHERD_AMQP_URL"))
        handle = _handle(process, worker_id, run)
        process.launch(self, run, worker_id, handle)
        return handle

    def can_reach(self, handle: Handle) -> bool:
        return self._where(handle) is not None

    async def check_health(self, handle: Handle) -> Health:
        where = self._where(handle)
        if where is None:
            if handle.get("host") == self.hostname and not _fleet_alive(handle):
                return Health(HealthStatus.NOT_FOUND, message="its sim fleet (process) is gone")
            return Health(HealthStatus.UNKNOWN, message=f"the worker lives in sim fleet {handle.get('fleet')}")
        if isinstance(where, FleetProcess):
            return where.health(str(handle.get("worker_id")))
        worker = where.find(handle)
        if worker is None:
            return Health(HealthStatus.NOT_FOUND, message=f"no virtual worker {handle.get('worker_id')}")
        if worker.exit is None:
            return Health(HealthStatus.RUNNING)
        code = worker.exit.exit_code
        status = HealthStatus.SUCCESS if code == 0 else HealthStatus.FAILED
        return Health(status, exit_code=code, reason=worker.exit.reason, message=worker.exit.message)

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        where = self._where(handle)
        grace = self.cfg.terminate_grace_seconds if grace_seconds is None else grace_seconds
        if isinstance(where, FleetProcess):
            if str(handle.get("worker_id")) not in where.live:
                return False
            try:
                return bool(await where.request("terminate", worker_id=handle.get("worker_id"), grace=grace))
            except FleetGone:  # it went with its process (and was reported exited)
                return True
        worker = where.find(handle) if where is not None else None
        if worker is None or worker.exit is not None:
            return False
        await self.fleet.run(worker.terminate(grace))
        return True

    async def debug_info(self, handle: Handle) -> str:
        where = self._where(handle)
        text = exited_log(str(handle.get("worker_id")))
        if text is not None:
            return text
        if isinstance(where, FleetProcess):
            with contextlib.suppress(FleetGone):
                text = await where.request("debug", worker_id=handle.get("worker_id"))
        elif where is not None:
            worker = where.find(handle)
            text = None if worker is None else worker.log()
        if text is None:
            return f"(virtual worker {handle.get('worker_id')} of sim fleet {handle.get('fleet')}: not in this process)"
        return text

    def watch(self) -> AsyncIterator[WorkerExit]:
        return self._watch()

    async def _watch(self) -> AsyncIterator[WorkerExit]:
        while True:
            yield await self.exits.get()

    async def adopt(self, handles: list[Handle]) -> None:
        self._home = asyncio.get_running_loop()
        for handle in handles:
            where = self._where(handle)
            if isinstance(where, FleetProcess):
                self._process = where
                exit_ = where.adopt(self, str(handle.get("worker_id")))
                if exit_ is not None:
                    self.exits.put_nowait(exit_)
            elif where is not None:
                worker = where.find(handle)
                if worker is not None and worker.exit is not None:
                    self.exits.put_nowait(worker.exit)
                elif worker is not None:
                    worker.owners.add(self)
            elif handle.get("host") == self.hostname and not _fleet_alive(handle):
                self.exits.put_nowait(_gone_exit(handle))

    async def close(self) -> None:
        if self._control is not None:
            self._control.cancel()
            with contextlib.suppress(BaseException):
                await self._control
        if self._process is not None:
            process, self._process = self._process, None
            await process.release(self)
            return
        orphans = []
        for worker in list(self.fleet.live.values()):
            worker.owners.discard(self)
            if not worker.owners:
                orphans.append(worker)
        if orphans:
            await self.fleet.run(stop_workers(self.fleet, orphans))

    # --- commands ---------------------------------------------------------------------------

    def command(self, action: str, run_ids: Iterable[str] | None = None) -> int:
        """Tell live workers of this process to succeed, fail, crash or hang; returns how many."""
        if action not in ACTIONS:
            raise InvalidMessage(f"sim: action: expected one of {', '.join(ACTIONS)}")
        return self._command(action, None if run_ids is None else set(run_ids))

    def _command(self, action: str, run_ids: set[str] | None) -> int:
        if not self.cfg.fleet_process:
            return self.fleet.command(action, run_ids)
        process = sim_host.current()
        return 0 if process is None else process.command(action, run_ids)

    def _follow_commands(self, url: str | None) -> None:
        if self._control is None and url:
            self._control = asyncio.ensure_future(self._commands(url))

    async def _commands(self, url: str) -> None:
        while True:
            broker: Broker | None = None
            try:
                broker = await Broker.connect(url, declare=False)
                await broker.declare_fanout(CONTROL_EXCHANGE)
                subscription = await broker.follow(CONTROL_EXCHANGE, [""])
                async for received in subscription:
                    try:
                        action, run_ids = parse_command(orjson.loads(received.body))
                    except (InvalidMessage, orjson.JSONDecodeError) as exc:
                        log.warning("sim: command ignored: %s", exc)
                        continue
                    count = self._command(action, run_ids)
                    log.info("sim: %s sent to %d virtual workers", action, count)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sim: control channel lost (%r); following again in 1 s", exc)
                await asyncio.sleep(1)
            finally:
                if broker is not None:
                    await broker.close()
