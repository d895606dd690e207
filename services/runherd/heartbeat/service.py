"""`runherd heartbeat`: batches worker heartbeats and writes last-seen times, one statement a
batch, acking only after the commit. Any number of replicas share the queue."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from runherd import broker as topology
from runherd import metrics
from runherd.broker import Broker, Delivery
from runherd.contract import decode, parse_heartbeat
from runherd.errors import InvalidMessage
from runherd.heartbeat.watermark import Canaries
from runherd.runtime import Supervisor, retrying
from runherd.store import Store
from runherd.store.store import TransientDbError

log = logging.getLogger("runherd.heartbeat")

BATCH_SIZE = 1000
BATCH_WAIT_SECONDS = 0.2


class HeartbeatService:
    def __init__(
        self, store: Store, broker: Broker, *, batch_size: int = BATCH_SIZE, batch_wait: float = BATCH_WAIT_SECONDS
    ) -> None:
        self.store = store
        self.broker = broker
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.canaries = Canaries(store, broker)

    async def run(self, supervisor: Supervisor) -> None:
        stop = supervisor.stop
        await self.canaries.register()
        supervisor.spawn("heartbeat.canaries", self.canaries.run(stop))
        supervisor.spawn("heartbeat.ingest", retrying("heartbeat ingest", lambda: self._ingest(stop), stop))

    async def _ingest(self, stop: asyncio.Event) -> None:
        async for batch in self.broker.batches(
            topology.HEARTBEATS_QUEUE, max_size=self.batch_size, max_wait=self.batch_wait, stop=stop
        ):
            await self.write(batch)

    async def write(self, batch: list[Delivery]) -> int:
        beats, good, bad = [], [], []
        for delivery in batch:
            try:
                beat = parse_heartbeat(decode(delivery.body))
            except InvalidMessage as exc:
                bad.append((delivery, str(exc)))
                continue
            beats.append((beat.run_id, beat.attempt, beat.ts))
            good.append(delivery)
        try:
            touched = await self.store.record_heartbeats(beats, replica=self.canaries.replica)
        except TransientDbError:
            await self.broker.requeue(good)
            raise
        except Exception:
            log.exception("heartbeat batch failed; writing its heartbeats one by one")
            touched, failed = await self._one_by_one(beats, good)
            bad.extend(failed)
            failed_ids = {id(f[0]) for f in failed}
            good = [d for d in good if id(d) not in failed_ids]
        for delivery, reason in bad:
            metrics.DEAD_LETTERS.labels(topology.HEARTBEATS_QUEUE).inc()
            await self.broker.dead_letter(delivery, reason)
        await self.broker.ack(good)  # the lag metric comes from the canaries: one clock, the database's
        return touched

    async def _one_by_one(
        self, beats: list[tuple[str, int, datetime]], deliveries: list[Delivery]
    ) -> tuple[int, list[tuple[Delivery, str]]]:
        """Isolates the heartbeat that broke a batch: it is dead-lettered, the others written."""
        touched, failed = 0, []
        for beat, delivery in zip(beats, deliveries, strict=True):
            try:
                touched += await self.store.record_heartbeats([beat], replica=self.canaries.replica)
            except TransientDbError:
                raise
            except Exception as exc:
                failed.append((delivery, f"heartbeat could not be written: {exc!r}"))
        return touched, failed
