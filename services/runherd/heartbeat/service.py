"""`runherd heartbeat`: batches worker heartbeats and writes last-seen times, one statement a
batch, acking only after the commit. Any number of replicas share the queue."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from runherd import broker as topology
from runherd import metrics
from runherd.auth import TOKEN_HEADER, WORKER, Keys, refusal
from runherd.broker import Broker, Delivery
from runherd.consume import APPLIED, Reject, Verdict, consume
from runherd.contract import decode, parse_heartbeat
from runherd.errors import InvalidMessage
from runherd.heartbeat.watermark import CANARY_RUN_ID, Canaries
from runherd.runtime import Supervisor, retrying
from runherd.store import Store
from runherd.store.store import TransientDbError

log = logging.getLogger("runherd.heartbeat")

BATCH_SIZE = 1000
BATCH_WAIT_SECONDS = 0.03  # a heartbeat waits at most this for its batch to fill: lag p99 < 100 ms


class HeartbeatService:
    def __init__(
        self, store: Store, broker: Broker, *, batch_size: int = BATCH_SIZE, batch_wait: float = BATCH_WAIT_SECONDS
    ) -> None:
        self.store = store
        self.broker = broker
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.canaries = Canaries(store, broker)
        self.keys: Keys | None = None  # read from the store at the first batch
        self.forged = 0

    async def run(self, supervisor: Supervisor) -> None:
        stop = supervisor.stop
        await self.canaries.register()
        supervisor.spawn("heartbeat.canaries", self.canaries.run(stop))
        supervisor.spawn("heartbeat.ingest", retrying("heartbeat ingest", lambda: self._ingest(stop), stop))

    async def _ingest(self, stop: asyncio.Event) -> None:
        await consume(
            self.broker,
            topology.HEARTBEATS_QUEUE,
            self.write,
            stop=stop,
            max_size=self.batch_size,
            max_wait=self.batch_wait,
            unavailable=TransientDbError,
        )

    async def write(self, batch: list[Delivery]) -> list[Verdict]:
        """One statement for the batch's heartbeats; a bad one is rejected, the rest written."""
        verdicts: list[Verdict] = [APPLIED] * len(batch)
        beats, good = [], []
        if self.keys is None:
            self.keys = await self.store.event_keys()
        for i, delivery in enumerate(batch):
            try:
                beat = parse_heartbeat(decode(delivery.body))
            except InvalidMessage as exc:
                verdicts[i] = Reject(str(exc))
                continue
            except Exception as exc:  # a validator bug must not stall every heartbeat behind this one
                verdicts[i] = Reject(f"heartbeat could not be parsed: {exc!r}")
                continue
            if beat.run_id != CANARY_RUN_ID and self._forged(beat.run_id, beat.attempt, delivery):
                continue  # dropped (acked) and counted
            beats.append((beat.run_id, beat.attempt, beat.ts))
            good.append(i)
        try:
            await self.store.record_heartbeats(beats, replica=self.canaries.replica)
        except TransientDbError:
            raise
        except Exception:
            log.exception("heartbeat batch failed; writing its heartbeats one by one")
            for i, reason in await self._one_by_one(beats, good):
                verdicts[i] = Reject(reason)
        # The lag metric comes from the canaries: one clock, the database's.
        return verdicts

    def _forged(self, run_id: str, attempt: int, delivery: Delivery) -> bool:
        """A heartbeat whose token does not prove its run's attempt is dropped and counted, not
        dead-lettered: heartbeats are transient and many, a forged one says nothing worth keeping,
        and a flood of them must not fill the dead-letter queue. The first and every 1,000th is
        logged."""
        assert self.keys is not None
        reason = refusal(self.keys, WORKER, run_id, attempt, delivery.headers.get(TOKEN_HEADER))
        if reason is None:
            return False
        metrics.FORGED.labels("heartbeat").inc()
        self.forged += 1
        if self.forged % 1000 == 1:
            log.warning(
                "dropped forged heartbeat run_id=%s attempt=%s: %s (%d so far)", run_id, attempt, reason, self.forged
            )
        return True

    async def _one_by_one(self, beats: list[tuple[str, int, datetime]], indexes: list[int]) -> list[tuple[int, str]]:
        """Isolates the heartbeat that broke a batch: it is dead-lettered, the others written."""
        failed = []
        for beat, i in zip(beats, indexes, strict=True):
            try:
                await self.store.record_heartbeats([beat], replica=self.canaries.replica)
            except TransientDbError:
                raise
            except Exception as exc:
                failed.append((i, f"heartbeat could not be written: {exc!r}"))
        return failed
