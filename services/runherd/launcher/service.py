"""`runherd launcher`: consumes commands, dequeues under the coordinator's limits, launches
workers, and reports every worker exit its run launcher sees as a WORKER_EXITED event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from runherd import auth, killing, outbox
from runherd import broker as topology
from runherd.broker import Broker, Delivery
from runherd.config import Config
from runherd.consume import APPLIED, Reject, Retry, Verdict, consume
from runherd.contract import Event, EventType, Launch, decode, now_iso
from runherd.errors import InvalidMessage
from runherd.launcher import commands
from runherd.launcher.launching import HandleMap, Launching
from runherd.launchers import RunLauncher, WorkerExit
from runherd.limits import check_command
from runherd.rules.events import describe_exit
from runherd.runtime import Supervisor, retrying, sleep_or_stop
from runherd.store import Store
from runherd.store.store import LAUNCH_CHANNEL, TransientDbError

log = logging.getLogger("runherd.launcher")

# Commands are taken in batches: consecutive launches are stored in one transaction.
COMMAND_BATCH = 500
LAUNCH = "launch"
COMMAND_BATCH_WAIT_SECONDS = 0.05
EXIT_REPORTS_IN_FLIGHT = 64  # WORKER_EXITED publishes awaiting their confirm at once


class LauncherService:
    def __init__(self, config: Config, store: Store, broker: Broker, launcher: RunLauncher) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self.launcher = launcher
        self.handles = HandleMap()
        self.launching = Launching(config, store, launcher, self.handles)
        self.wake = asyncio.Event()  # the dequeue loop: launches came in, or a notification
        self.wake_claims = asyncio.Event()  # the claim loop: attempts may be waiting for a worker
        self._background: set[asyncio.Task[bool]] = set()

    async def run(self, supervisor: Supervisor, *, relay: bool = True) -> None:
        stop = supervisor.stop
        await self._adopt()
        supervisor.spawn("launcher.commands", retrying("command consumer", lambda: self._commands(stop), stop))
        supervisor.spawn("launcher.launch-loop", self._launch_loop(stop))
        supervisor.spawn("launcher.exits", retrying("exit watcher", lambda: self._exits(stop), stop))
        if relay:
            supervisor.spawn("launcher.outbox", outbox.relay(self.store, self.broker, stop))

    async def _adopt(self) -> None:
        """Workers launched before a restart are watched again, so no exit goes unreported."""
        refs = [
            r for r in await self.store.live_handles() if r.handle and r.handle.get("launcher") == self.launcher.name
        ]
        for ref in refs:
            assert ref.handle is not None
            self.handles[(ref.run_id, ref.attempt)] = ref.handle
        if refs:
            await self.launcher.adopt([r.handle for r in refs if r.handle])
            log.info("adopted %d live workers", len(refs))

    # --- commands ---------------------------------------------------------------------------

    async def _commands(self, stop: asyncio.Event) -> None:
        await consume(
            self.broker,
            topology.COMMANDS_QUEUE,
            self.commands,
            stop=stop,
            max_size=COMMAND_BATCH,
            max_wait=COMMAND_BATCH_WAIT_SECONDS,
            unavailable=TransientDbError,
        )

    async def commands(self, batch: list[Delivery]) -> list[Verdict]:
        """The batch in arrival order: each run of consecutive launches in one transaction, each run
        of consecutive kill requests in one lookup, any other command on its own (a terminate after
        a launch of the same run sees the run)."""
        verdicts: list[Verdict] = []
        start = 0
        while start < len(batch):
            key = batch[start].routing_key
            end = start + 1
            if key in (LAUNCH, killing.KILL_KEY):
                while end < len(batch) and batch[end].routing_key == key:
                    end += 1
            if key == LAUNCH:
                verdicts += await self.launches(batch[start:end])
            elif key == killing.KILL_KEY:
                verdicts += await self.kills(batch[start:end])
            else:
                verdicts.append(await self.command(batch[start]))
            start = end
        return verdicts

    async def kills(self, batch: list[Delivery]) -> list[Verdict]:
        """Kill requests (internal, from monitors), validated one by one, looked up together."""
        verdicts: list[Verdict] = [APPLIED] * len(batch)
        requests = []
        for i, delivery in enumerate(batch):
            try:
                data = decode(delivery.body)
                check_command(killing.KILL_KEY, data, self.config.limits)
                requests.append(killing.parse_request(data))
            except InvalidMessage as exc:
                verdicts[i] = Reject(str(exc))
        await commands.kill_many(self.store, self.launcher, requests)
        return verdicts

    async def launches(self, batch: list[Delivery]) -> list[Verdict]:
        """Launches validated one by one (a bad one is dead-lettered with its reason), the good
        ones inserted together; should the batch insert fail unexpectedly, each is tried alone so
        that one launch's problem is that launch's verdict only."""
        verdicts: list[Verdict] = [APPLIED] * len(batch)
        good: list[tuple[int, Launch]] = []
        for i, delivery in enumerate(batch):
            try:
                launch = commands.parse_launch(
                    decode(delivery.body),
                    launcher=self.launcher.name,
                    message_id=delivery.message_id,
                    limits=self.config.limits,
                )
            except InvalidMessage as exc:
                verdicts[i] = Reject(str(exc))
                continue
            good.append((i, launch))
        try:
            await commands.insert_launches(self.store, [launch for _, launch in good])
        except TransientDbError:
            raise
        except Exception:
            log.exception("a batch of %d launches failed; inserting them one by one", len(good))
            for i, launch in good:
                verdicts[i] = await self._insert_one(launch)
        if good:
            self.wake.set()
        return verdicts

    async def _insert_one(self, launch: Launch) -> Verdict:
        try:
            await commands.insert_launch(self.store, launch)
        except TransientDbError:
            raise
        except Exception as exc:
            log.exception("launch failed to insert run_id=%s", launch.run_id)
            return Retry(f"launch could not be stored: {exc!r}")
        return APPLIED

    async def command(self, delivery: Delivery) -> Verdict:
        try:
            outcome = await commands.apply(
                self.store,
                delivery.routing_key,
                decode(delivery.body),
                launcher=self.launcher.name,
                message_id=delivery.message_id,
                run_launcher=self.launcher,
                limits=self.config.limits,
            )
        except InvalidMessage as exc:
            return Reject(str(exc))
        self.wake.set()
        for ref in outcome.terminate:
            if ref.handle:
                task = asyncio.ensure_future(self.launcher.terminate(ref.handle))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return APPLIED

    # --- launching --------------------------------------------------------------------------

    async def _launch_loop(self, stop: asyncio.Event) -> None:
        """Two loops: one claims and launches the attempts waiting for a worker, the other dequeues
        under the limits. Apart, so that a crash storm's resumes (attempts ready at once) never wait
        behind the dequeue statement, which a busy database can take hundreds of milliseconds on."""

        def woken() -> None:
            self.wake.set()
            self.wake_claims.set()

        unlisten = await self.store.listen(LAUNCH_CHANNEL, woken)
        interval = self.config.run_coordinator.dequeue_interval_seconds
        try:
            await asyncio.gather(
                self._round_loop(stop, "claim", self.launching.claim_ready, interval, self.wake_claims),
                self._round_loop(stop, "dequeue", self._dequeue, interval, self.wake),
            )
            await self.launching.drain()
        finally:
            await unlisten()

    async def _dequeue(self) -> int:
        moved = len(await self.launching.dequeue())
        if moved:
            self.wake_claims.set()
        return moved

    async def _round_loop(
        self, stop: asyncio.Event, what: str, round_: Callable[[], Awaitable[int]], interval: float, wake: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                if await round_():
                    continue
            except TransientDbError as exc:
                log.warning("%s round failed: %r", what, exc)
            except Exception:
                # The launch loops must outlive anything one round meets: claims come back by lease.
                log.exception("%s round failed unexpectedly", what)
            await sleep_or_stop(stop, interval, wake)

    # --- exits ------------------------------------------------------------------------------

    async def _exits(self, stop: asyncio.Event) -> None:
        stream = self.launcher.watch()
        if stream is None:
            await stop.wait()
            return
        stopped = asyncio.ensure_future(stop.wait())
        slots = asyncio.Semaphore(EXIT_REPORTS_IN_FLIGHT)
        reports: set[asyncio.Task[None]] = set()

        async def report(exit_: WorkerExit) -> None:
            try:
                await self.report_exit(exit_)
            except Exception:
                log.exception("could not report the exit of run_id=%s attempt=%s", exit_.run_id, exit_.attempt)
            finally:
                slots.release()

        try:
            while True:
                next_exit = asyncio.ensure_future(anext(stream))
                await asyncio.wait({next_exit, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not next_exit.done():
                    next_exit.cancel()
                    return
                # Each exit is reported in a task of its own: fifty workers killed at once are
                # fifty publisher confirms in flight together, not fifty in a row.
                await slots.acquire()
                task = asyncio.ensure_future(report(next_exit.result()))
                reports.add(task)
                task.add_done_callback(reports.discard)
        finally:
            stopped.cancel()
            if reports:
                await asyncio.gather(*reports, return_exceptions=True)

    async def report_exit(self, exit_: WorkerExit) -> None:
        handle = self.handles.pop((exit_.run_id, exit_.attempt), None)
        debug = ""
        if handle is not None:
            try:
                debug = await self.launcher.debug_info(handle)
            except Exception as exc:
                debug = f"(debug_info failed: {exc!r})"
        event = Event(
            run_id=exit_.run_id,
            attempt=exit_.attempt,
            seq=0,
            source="launcher",
            type=EventType.WORKER_EXITED,
            message=describe_exit(exit_.exit_code, exit_.signal, exit_.reason),
            data={
                "exit_code": exit_.exit_code,
                "signal": exit_.signal,
                "reason": exit_.reason,
                "detail": exit_.message,
                "debug_info": debug[-4000:],
                "exited_at": now_iso(),
            },
            ts=now_iso(),
        )
        keys = self.launching.keys or await self.store.event_keys()
        self.launching.keys = keys
        proof = auth.token(keys.current, auth.LAUNCHER, exit_.run_id, exit_.attempt)
        await self.broker.publish_event(exit_.run_id, event.body(), token=proof, shards=self.config.event_shards)
        log.info("worker exited run_id=%s attempt=%s %s", exit_.run_id, exit_.attempt, event.message)
