"""Canaries: how the monitor tells "this worker is silent" from "I cannot hear anyone".

Each heartbeat service replica publishes, about ten times a second, canaries through the real
``runherd.heartbeats`` exchange, one per live replica, back to back: a heartbeat body whose
``run_id`` is the nil UUID and whose ``attempt`` is a random nonce. Before publishing it asks
PostgreSQL for a stamp (the database's time now, kept in ``heartbeat_canaries`` beside the nonce; the
message carries no time of its own).

The queue is FIFO, and a replica writes its deliveries in the order it received them. So when a
replica writes a batch holding a canary stamped T, every heartbeat published before T that RabbitMQ
handed to this replica has been written (in this batch or an earlier one), and the replica's
``heard_through`` advances to T (``record_heartbeats``). Heartbeats published before T may have gone
to another replica, so the pipeline is heard through the *least* watermark of the live replicas
(``runherd_heard_through()``). The hang rule measures a worker's silence up to that watermark: if the
service, the broker or the queue stalls, the watermark stops with the heartbeats and no run is flagged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import uuid

from runherd import metrics
from runherd.broker import Broker
from runherd.contract import heartbeat_body
from runherd.runtime import sleep_or_stop
from runherd.store import Store

log = logging.getLogger("runherd.heartbeat.watermark")

CANARY_RUN_ID = "00000000-0000-0000-0000-000000000000"
# A replica's watermark moves only when it writes a canary, and RabbitMQ hands each canary to any
# replica (round robin over every message of the queue): with two replicas a replica goes k canaries
# without one with chance 1/2^k. At 0.5 s apart that left a replica 2-3 s behind at p99 (measured
# with 10,000 workers), and the hang rule fires that late. At 0.1 s apart, 20 canaries a second
# between two replicas, p99 is a few tenths of a second; a canary is one INSERT and one message.
CANARY_SECONDS = 0.1
# A replica sends one canary per live replica each time, back to back: RabbitMQ deals adjacent
# messages to different consumers, so each replica's watermark moves about every 0.1 s / replicas
# instead of whenever chance sends it one (that left it 0.5 s behind at p99 with two replicas).
MAX_CANARIES_AT_ONCE = 8
LAG_SAMPLE_SECONDS = 0.5  # runherd_heartbeat_lag_seconds is sampled this often, not per canary
_NONCES = 2**31 - 1  # a heartbeat's attempt is a positive int32


def canary_body(nonce: int) -> bytes:
    """A canary is a heartbeat like any other on the wire: the public body stays as it is."""
    return heartbeat_body(CANARY_RUN_ID, nonce)


def next_pause(period: float, rand: float) -> float:
    """``period`` ± 25 %: replicas do not publish in lockstep, so RabbitMQ's round robin hands each
    replica canaries (a replica that never got one would hold the watermark back)."""
    return period * (0.75 + 0.5 * rand)


class Canaries:
    """This replica's identity in ``heartbeat_replicas`` and its canary loop."""

    def __init__(self, store: Store, broker: Broker, period: float = CANARY_SECONDS) -> None:
        self.store = store
        self.broker = broker
        self.period = period
        self.replica = f"hb-{uuid.uuid4().hex[:12]}"
        self.replicas = 1  # live replicas at the last canary: how many canaries to send at once

    async def register(self) -> None:
        """Before consuming: a replica counts (at -infinity) from before it can hold a heartbeat."""
        await self.publish_one()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        sampled = 0.0
        try:
            while not stop.is_set():
                try:
                    await self.publish_one()
                    if loop.time() - sampled >= LAG_SAMPLE_SECONDS:
                        sampled = loop.time()
                        lag = await self.store.heard_lag()
                        if lag is not None:
                            metrics.HEARTBEAT_LAG.observe(max(0.0, lag))
                except Exception as exc:  # a database or broker blip: the watermark waits, nothing else
                    log.warning("canary not published (replica %s): %r", self.replica, exc)
                await sleep_or_stop(stop, next_pause(self.period, random.random()))
        finally:
            with contextlib.suppress(Exception):
                await self.store.forget_replica(self.replica)

    async def publish_one(self) -> None:
        """One canary for each live replica, stamped at once and published back to back."""
        nonces = {secrets.randbelow(_NONCES) + 1 for _ in range(self.replicas)}
        issued, replicas = await self.store.issue_canaries(self.replica, sorted(nonces))
        self.replicas = min(MAX_CANARIES_AT_ONCE, max(1, replicas))
        # Written one after another on the channel; only the confirms are awaited together.
        await asyncio.gather(*(self.broker.publish_heartbeat(canary_body(n)) for n in issued))
