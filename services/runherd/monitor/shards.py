"""Sharded event ingest (``event_shards`` > 1): which shards this monitor replica consumes.

Every replica renews a lease row in PostgreSQL each second and reads the live replicas; a pure
function (rendezvous hashing, runherd.sharding) gives each shard to one of them, so every replica computes the same
assignment and a join or leave moves only the shards it must. A replica cancels the consumers of
the shards it lost and consumes the shards it gained. Every shard queue has a single active
consumer, so the overlap while replicas disagree for a moment is harmless: RabbitMQ keeps one
consumer active and the others wait. A replica that dies stops renewing its lease; once it
expires (``LEASE_SECONDS``) the others take its shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from runherd.runtime import retrying, sleep_or_stop
from runherd.sharding import LEASE_SECONDS, assigned
from runherd.store import Store

log = logging.getLogger("runherd.monitor.shards")

PERIOD_SECONDS = 1.0


class ShardConsumers:
    """Keeps one consumer per assigned shard, re-evaluated every ``period`` seconds."""

    def __init__(
        self,
        store: Store,
        replica: str,
        shards: int,
        consume_shard: Callable[[int, asyncio.Event], Awaitable[None]],
        *,
        lease: float = LEASE_SECONDS,
        period: float = PERIOD_SECONDS,
    ) -> None:
        self.store = store
        self.replica = replica
        self.shards = shards
        self.consume_shard = consume_shard
        self.lease = lease
        self.period = period
        self.stops: dict[int, asyncio.Event] = {}  # shard -> its consumer's stop
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def mine(self) -> frozenset[int]:
        return frozenset(self.stops)

    async def loop(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    live = await self.store.monitor_lease(self.replica, self.lease)
                    self.rebalance(assigned(self.replica, live, self.shards))
                except Exception as exc:  # keep what it has: single active consumers make it safe
                    log.warning("shard assignment not renewed replica=%s: %r", self.replica, exc)
                await sleep_or_stop(stop, self.period)
        finally:
            self.rebalance(frozenset())
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=5)
            with contextlib.suppress(Exception):
                await self.store.forget_monitor(self.replica)

    def rebalance(self, wanted: frozenset[int]) -> None:
        lost, gained = self.mine - wanted, wanted - self.mine
        for shard in lost:
            self.stops.pop(shard).set()
        for shard in sorted(gained):
            self.stops[shard] = shard_stop = asyncio.Event()
            task = asyncio.ensure_future(
                retrying(f"event shard {shard}", self._consumer(shard, shard_stop), shard_stop)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if lost or gained:
            log.info(
                "event shards replica=%s consuming=%s (gained %s, lost %s)",
                self.replica,
                sorted(self.mine),
                sorted(gained),
                sorted(lost),
            )

    def _consumer(self, shard: int, shard_stop: asyncio.Event) -> Callable[[], Awaitable[None]]:
        return lambda: self.consume_shard(shard, shard_stop)
