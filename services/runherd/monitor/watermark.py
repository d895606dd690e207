"""Event canaries: the hang rule must not fire while a worker's RUN_SUCCESS is still queued.

Each monitor publishes, about twice a second, a canary on ``runherd.events`` with the routing key
``run.<nil uuid>`` and a nonce in its body; the stamp (the database's time when it was issued) stays
in ``event_canaries``. The events queue has a single active consumer that applies deliveries in
order, so once the batch holding a canary is committed, every event published before its stamp is
applied, and the event watermark advances to it. ``runherd_heard_through()`` takes the least of this
and the heartbeat watermark (services/runherd/heartbeat/watermark.py): an event backlog older than
the heartbeat timeout holds the hang rule instead of resuming runs whose end is still queued.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets

import orjson

from runherd import broker as topology
from runherd.broker import Broker, Delivery
from runherd.contract import SHARD_HEADER
from runherd.runtime import sleep_or_stop
from runherd.store import Store

log = logging.getLogger("runherd.monitor.watermark")

CANARY_RUN_ID = "00000000-0000-0000-0000-000000000000"
CANARY_KEY = f"run.{CANARY_RUN_ID}"
CANARY_SECONDS = 0.5
_NONCES = 2**31 - 1


def canary_body(nonce: int) -> bytes:
    return orjson.dumps({"v": 1, "run_id": CANARY_RUN_ID, "canary": nonce})


def split_canaries(batch: list[Delivery]) -> tuple[list[Delivery], list[Delivery], list[int]]:
    """(the events, the canaries, their nonces). A canary whose body is not one is left with the
    events, to be dead-lettered with the reason like any bad message."""
    events, canaries, nonces = [], [], []
    for delivery in batch:
        nonce = _nonce(delivery) if delivery.routing_key == CANARY_KEY else None
        if nonce is None:
            events.append(delivery)
        else:
            canaries.append(delivery)
            nonces.append(nonce)
    return events, canaries, nonces


def _nonce(delivery: Delivery) -> int | None:
    try:
        nonce = orjson.loads(delivery.body).get("canary")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return nonce if isinstance(nonce, int) and not isinstance(nonce, bool) and 0 < nonce <= _NONCES else None


async def publish_canaries(
    store: Store,
    broker: Broker,
    stop: asyncio.Event,
    period: float = CANARY_SECONDS,
    now: asyncio.Event | None = None,
    shards: int = 1,
) -> None:
    """A canary every ``period`` (jittered), and one at once whenever ``now`` is set (a deadline
    that waits on the watermark has come: services/monitor/service.py). With ``shards`` > 1, a
    round: a canary per shard and one for the unsharded events queue, sharing one stamp; the
    watermark moves once all of them are applied (the least over the shards)."""
    while not stop.is_set():
        try:
            if shards > 1:
                await _publish_round(store, broker, shards)
                await sleep_or_stop(stop, period * (0.75 + 0.5 * random.random()), now)
                continue
            nonce = secrets.randbelow(_NONCES) + 1
            if await store.issue_event_canary(nonce) is not None:
                await broker.publish(topology.EVENTS, CANARY_KEY, canary_body(nonce))
        except Exception as exc:  # a database or broker blip: the watermark waits, nothing else
            log.warning("event canary not published: %r", exc)
        await sleep_or_stop(stop, period * (0.75 + 0.5 * random.random()), now)


async def _publish_round(store: Store, broker: Broker, shards: int) -> None:
    nonces = [secrets.randbelow(_NONCES) + 1 for _ in range(shards + 1)]
    if len(set(nonces)) != len(nonces) or not await store.issue_event_canary_round(nonces):
        return
    for shard, nonce in enumerate(nonces):
        # The last one carries no shard header: it goes to the unsharded events queue.
        headers = {SHARD_HEADER: str(shard)} if shard < shards else None
        await broker.publish(topology.EVENTS, CANARY_KEY, canary_body(nonce), headers=headers)
