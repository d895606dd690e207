"""The status outbox relay: publishes committed status changes on `runherd.status`.

A transition and its status message are written in one PostgreSQL transaction (the outbox), so a
crash between commit and publish loses nothing: the relay publishes the rows, with publisher
confirms, and deletes them only after. One relay is active at a time (a session advisory lock),
which keeps each run's statuses in order; every service process runs a candidate. A crash after
publish and before delete re-publishes: subscribers can dedupe on the AMQP message_id.
"""

from __future__ import annotations

import asyncio
import logging

from runherd import metrics
from runherd.broker import Broker
from runherd.runtime import sleep_or_stop
from runherd.store import Store
from runherd.store.store import OUTBOX_CHANNEL

log = logging.getLogger("runherd.outbox")

BATCH = 500


async def relay(store: Store, broker: Broker, stop: asyncio.Event, idle_poll: float = 0.5) -> None:
    wake = asyncio.Event()
    unlisten = await store.listen(OUTBOX_CHANNEL, wake.set)
    try:
        while not stop.is_set():
            try:
                async with store.outbox_leadership() as conn:
                    if conn is None:
                        await sleep_or_stop(stop, 1.0)
                        continue
                    while not stop.is_set():
                        if not await _publish_batch(store, broker, conn):
                            await sleep_or_stop(stop, idle_poll, wake)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay interrupted: %r; retrying", exc)
                await sleep_or_stop(stop, 1.0)
    finally:
        await unlisten()


async def flush(store: Store, broker: Broker, timeout: float = 5.0) -> int:
    """Publish what is left in the outbox, at shutdown, after the consumers have stopped (their last
    transitions are committed by then). Skipped if another process holds the relay: it goes on."""

    async def drain() -> int:
        published = 0
        async with store.outbox_leadership() as conn:
            if conn is None:
                return 0
            while n := await _publish_batch(store, broker, conn):
                published += n
        return published

    try:
        return await asyncio.wait_for(drain(), timeout)
    except Exception as exc:
        log.warning("outbox not flushed at shutdown (%r); the next relay publishes the rest", exc)
        return 0


async def _publish_batch(store: Store, broker: Broker, conn: object) -> int:
    rows = await store.outbox_batch(conn, BATCH)
    if not rows:
        return 0
    # Published in id order on one channel; the confirms are awaited together.
    await asyncio.gather(
        *(broker.publish_status(key, body, message_id=f"status-{row_id}") for row_id, key, body in rows)
    )
    await store.outbox_delete(conn, [r[0] for r in rows])
    metrics.STATUS_PUBLISHED.inc(len(rows))
    return len(rows)
