"""`runherd monitor`: ingests lifecycle events and sweeps for violators. Any number of replicas."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from datetime import UTC, datetime

from runherd import broker as topology
from runherd import metrics, outbox
from runherd.auth import TOKEN_HEADER, Keys, refusal, role_of
from runherd.broker import Broker, Delivery
from runherd.config import Config
from runherd.consume import APPLIED, Reject, Retry, Verdict, consume
from runherd.contract import Event, decode, parse_event
from runherd.errors import InvalidMessage
from runherd.launchers import RunLauncher
from runherd.monitor.actions import Actions
from runherd.monitor.gauges import Gauges
from runherd.monitor.ingest import Effects, LockedRuns, apply_event
from runherd.monitor.shards import ShardConsumers
from runherd.monitor.sweeper import Sweeper
from runherd.monitor.watermark import publish_canaries, split_canaries
from runherd.runtime import Supervisor, retrying, sleep_or_stop
from runherd.store import Store
from runherd.store.store import TransientDbError

log = logging.getLogger("runherd.monitor")


class MonitorService:
    def __init__(self, config: Config, store: Store, broker: Broker, launcher: RunLauncher) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self.launcher = launcher
        self.actions = Actions(store, launcher, broker)
        self.sweeper = Sweeper(config, store, launcher, self.actions)
        self.sweep_now = asyncio.Event()
        self.keys: Keys | None = None  # read from the store at the first batch
        self.canary_now = asyncio.Event()  # publish an event canary at once (a deadline has come)
        self._sweep_on_canary = False  # sweep as soon as the next canary is applied
        self._nudged_for = -1.0  # the start deadline (loop time) a canary was last published for
        self.gauges = Gauges(config, store, broker)
        # The replica's name in the lease table: its broker connection's, so RabbitMQ's list of
        # consumers tells which replica holds which shard.
        self.replica = broker.name or f"runherd-monitor@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.shards: ShardConsumers | None = None
        if config.event_shards > 1:
            self.shards = ShardConsumers(store, self.replica, config.event_shards, self._ingest_shard)

    async def run(self, supervisor: Supervisor, *, relay: bool = True) -> None:
        stop = supervisor.stop
        supervisor.spawn("monitor.ingest", retrying("event ingest", lambda: self._ingest(stop), stop))
        if self.shards is not None:
            supervisor.spawn("monitor.shards", self.shards.loop(stop))
        supervisor.spawn(
            "monitor.canaries",
            publish_canaries(self.store, self.broker, stop, now=self.canary_now, shards=self.config.event_shards),
        )
        # Always: with run_monitoring.enabled false the sweep still reaps and retries (sweeper.py).
        supervisor.spawn("monitor.sweep", self._sweep_loop(stop))
        # Its own loop: the sweep may sleep until the next deadline (up to a timeout), gauges may not.
        supervisor.spawn("monitor.gauges", self.gauges.loop(self.config.run_monitoring.poll_interval_seconds, stop))
        if relay:
            supervisor.spawn("monitor.outbox", outbox.relay(self.store, self.broker, stop))
        supervisor.spawn("monitor.actions", self._close_on_stop(stop))

    async def _close_on_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        await self.actions.close()

    async def _sweep_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            pause = self.config.run_monitoring.poll_interval_seconds
            try:
                await self.sweeper.sweep()
                pause = await self.sweeper.seconds_to_next_deadline()
                pause = await self._nudge_at_start_deadline(stop, pause)
            except TransientDbError as exc:
                log.warning("sweep failed: %r", exc)
            except Exception:
                # A sweep must outlive anything one round meets: the next round decides again.
                log.exception("sweep failed unexpectedly; sweeping again in %.1f s", pause)
            await sleep_or_stop(stop, pause, self.sweep_now)

    async def _nudge_at_start_deadline(self, stop: asyncio.Event, pause: float) -> float:
        """The start-timeout rule fires once an event canary issued after the deadline is applied
        (the event watermark). Rather than wait up to a canary period for the next one, sleep until
        the deadline itself, publish a canary then, and sweep as soon as it is applied: a mass start
        timeout fires milliseconds past its deadline. Once per deadline (a stale watermark must not
        make a canary storm). Returns what is left of ``pause``."""
        if not self.config.run_monitoring.enabled:
            return pause
        due = await self.store.starting_due(self.config.run_monitoring.start_timeout_seconds)
        loop = asyncio.get_running_loop()
        if due is None or due >= pause:
            return pause
        at = loop.time() + max(0.0, due)
        if at <= self._nudged_for + 0.001:
            return pause
        began = loop.time()
        if due > 0:
            await sleep_or_stop(stop, due + 0.002, self.sweep_now)
            if loop.time() < at:  # woken early (an event failed a run): sweep now, nudge next round
                self.sweep_now.set()
                return 0.0
        self._nudged_for = at
        self._sweep_on_canary = True
        self.canary_now.set()
        return max(0.0, pause - (loop.time() - began))

    async def refresh_gauges(self) -> None:
        await self.gauges.refresh()

    async def _ingest(self, stop: asyncio.Event) -> None:
        await consume(
            self.broker,
            topology.EVENTS_QUEUE,
            self.apply_batch,
            stop=stop,
            max_size=200,
            max_wait=0.01,
            unavailable=TransientDbError,
        )

    async def _ingest_shard(self, shard: int, stop: asyncio.Event) -> None:
        """One event shard, until this replica loses it (``stop``): the channel closes with what it
        prefetched, which RabbitMQ hands to the shard's next consumer first."""
        await consume(
            self.broker,
            topology.shard_queue(shard),
            self.apply_batch,
            stop=stop,
            max_size=200,
            max_wait=0.01,
            unavailable=TransientDbError,
            hand_back=True,
        )

    async def apply_batch(self, batch: list[Delivery]) -> list[Verdict]:
        """The events, then the canaries among them: a canary moves the event watermark only once
        the events before it are applied (the queue has one active consumer, so it is in order)."""
        events, _, nonces = split_canaries(batch)
        verdicts = await self._apply_events(events) if events else []
        if self.config.event_shards > 1:
            moved = await self.store.record_event_canary_rounds(nonces)
        else:
            await self.store.record_event_canaries(nonces)
            moved = bool(nonces)
        if moved and self._sweep_on_canary:
            self._sweep_on_canary = False
            self.sweep_now.set()
        of_event = {id(d): v for d, v in zip(events, verdicts, strict=True)}
        return [of_event.get(id(d), APPLIED) for d in batch]

    async def _apply_events(self, batch: list[Delivery]) -> list[Verdict]:
        """The batch in one transaction; if a statement fails, again event by event (savepoints)."""
        verdicts: list[Verdict] = [APPLIED] * len(batch)
        parsed: list[tuple[int, Event]] = []
        if self.keys is None:
            self.keys = await self.store.event_keys()
        for i, delivery in enumerate(batch):
            try:
                event = parse_event(decode(delivery.body))
            except InvalidMessage as exc:
                verdicts[i] = Reject(str(exc))
                continue
            except Exception as exc:  # a validator bug: refuse this event, not the whole batch
                verdicts[i] = Reject(f"event could not be parsed: {exc!r}")
                continue
            token = delivery.headers.get(TOKEN_HEADER)
            forged = refusal(self.keys, role_of(event.source), event.run_id, event.attempt, token)
            if forged is not None:
                # Dead-lettered, not dropped: an event is rare, and a forged one is evidence.
                metrics.FORGED.labels("event").inc()
                log.warning(
                    "refused %s run_id=%s attempt=%s source=%s: %s",
                    event.type.value,
                    event.run_id,
                    event.attempt,
                    event.source[:64],
                    forged,
                )
                verdicts[i] = Reject(f"{forged} (source {event.source[:64]!r})")
                continue
            parsed.append((i, event))
        try:
            effects = await self._apply(parsed, verdicts, careful=False)
        except TransientDbError:
            raise
        except Exception:
            log.warning("a batch of %d events failed; applying them one by one", len(parsed), exc_info=True)
            effects = await self._apply(parsed, verdicts, careful=True)
        await self._after(effects)
        return verdicts

    async def _apply(self, parsed: list[tuple[int, Event]], verdicts: list[Verdict], *, careful: bool) -> Effects:
        """One transaction for the batch; ``careful`` puts each event in a savepoint, so a failing
        one is retried alone (and dead-lettered after its last delivery) while the others commit."""
        effects = Effects()
        async with self.store.tx() as tx:
            runs = LockedRuns(tx, gather_steps=not careful)
            await runs.lock([event.run_id for _, event in parsed])
            for i, event in parsed:
                try:
                    if careful:
                        async with tx.conn.transaction():  # a savepoint per event
                            await apply_event(tx, event, self.config, effects, runs)
                    else:
                        await apply_event(tx, event, self.config, effects, runs)
                except InvalidMessage as exc:
                    verdicts[i] = Reject(str(exc))
                except TransientDbError:
                    raise
                except Exception as exc:
                    if not careful:
                        raise
                    runs.stale.add(event.run_id)  # its savepoint rolled back whatever it changed
                    log.exception("event could not be applied run_id=%s attempt=%s", event.run_id, event.attempt)
                    verdicts[i] = Retry(f"event could not be applied: {exc!r}")
            await runs.flush()
        return effects

    async def _after(self, effects: Effects) -> None:
        if effects.failed:
            self.sweep_now.set()
        now = datetime.now(UTC)
        for _, exited_at in effects.exits:
            metrics.DETECTION_LATENCY.labels("exit").observe(max(0.0, (now - exited_at).total_seconds()))
        for wanted, why in (
            (effects.fence, "fenced: its events are refused"),
            (effects.over_max_runtime, "exceeded max runtime"),
        ):
            if wanted:
                async with self.store.tx() as tx:
                    refs = await tx.handles([run_id for run_id, _ in wanted])
                pairs = set(wanted)
                self.actions.terminate_soon([r for r in refs if (r.run_id, r.attempt) in pairs], why)
