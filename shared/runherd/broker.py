"""RabbitMQ for runherd: the only module that imports aio_pika.

It declares the public topology of DESIGN.md, publishes with publisher confirms, and hands
consumers their deliveries in batches. One place decides ack / dead-letter / requeue:
``Batch.settle`` (and ``Delivery.dead_letter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from runherd.config import redact
from runherd.errors import RunherdError

log = logging.getLogger("runherd.broker")

COMMANDS = "runherd.commands"
EVENTS = "runherd.events"
HEARTBEATS = "runherd.heartbeats"
STATUS = "runherd.status"
DEAD = "runherd.dead"

COMMANDS_QUEUE = "runherd.launcher.commands"
EVENTS_QUEUE = "runherd.monitor.events"
HEARTBEATS_QUEUE = "runherd.heartbeats"
DEAD_QUEUE = "runherd.dead-letters"
ERROR_HEADER = "x-runherd-error"

HEARTBEAT_QUEUE_MAX = 100_000
RECONNECT_SECONDS = 1.0
# Events are published until confirmed, through a broker outage of up to this long.
PUBLISH_PATIENCE_SECONDS = 120.0
# A message whose handler keeps failing unexpectedly is dead-lettered after this many deliveries.
MAX_DELIVERIES = 5

_EXCHANGES = {
    COMMANDS: aio_pika.ExchangeType.DIRECT,
    EVENTS: aio_pika.ExchangeType.TOPIC,
    HEARTBEATS: aio_pika.ExchangeType.DIRECT,
    STATUS: aio_pika.ExchangeType.TOPIC,
    DEAD: aio_pika.ExchangeType.FANOUT,
}
_QUEUES: dict[str, tuple[dict[str, Any], str, list[str]]] = {
    # name: (arguments, exchange, routing keys)
    COMMANDS_QUEUE: (
        {"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD, "x-delivery-limit": MAX_DELIVERIES},
        COMMANDS,
        ["launch", "terminate", "reexecute", "kill"],  # kill: internal, monitor -> launcher
    ),
    # One active consumer at a time keeps each run's events in order (a STEP_SUCCESS is applied
    # before the launcher's report of the same worker's exit); other monitors stand by.
    EVENTS_QUEUE: (
        {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD,
            "x-delivery-limit": MAX_DELIVERIES,
            "x-single-active-consumer": True,
        },
        EVENTS,
        ["run.*"],
    ),
    HEARTBEATS_QUEUE: ({"x-max-length": HEARTBEAT_QUEUE_MAX, "x-overflow": "drop-head"}, HEARTBEATS, ["hb"]),
    DEAD_QUEUE: ({"x-queue-type": "quorum"}, DEAD, [""]),
}


class BrokerError(RunherdError):
    pass


@dataclass
class Delivery:
    body: bytes
    routing_key: str
    headers: dict[str, Any]
    message: AbstractIncomingMessage

    @property
    def deliveries(self) -> int:
        """How many times RabbitMQ has delivered this message (quorum queues count)."""
        count = self.headers.get("x-delivery-count")
        return int(count) + 1 if isinstance(count, int) else (2 if self.message.redelivered else 1)


class Broker:
    def __init__(self, connection: AbstractRobustConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def connect(cls, url: str, *, declare: bool = True, timeout: float = 10) -> Broker:
        try:
            connection = await aio_pika.connect_robust(url, timeout=timeout, reconnect_interval=RECONNECT_SECONDS)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise BrokerError(f"cannot connect to RabbitMQ at {redact(url)}: {exc!r}") from exc
        channel = await connection.channel(publisher_confirms=True)
        broker = cls(connection, channel)
        if declare:
            await broker.declare()
        else:
            for name in _EXCHANGES:
                broker._exchanges[name] = await channel.get_exchange(name, ensure=False)
        return broker

    async def declare(self) -> None:
        """Declare the public topology; idempotent, every service does it at start."""
        for name, kind in _EXCHANGES.items():
            self._exchanges[name] = await self.channel.declare_exchange(name, kind, durable=True)
        for queue, (arguments, exchange, keys) in _QUEUES.items():
            declared = await self.channel.declare_queue(queue, durable=True, arguments=arguments)
            for key in keys:
                await declared.bind(self._exchanges[exchange], routing_key=key)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.connection.close()

    # --- publishing ----------------------------------------------------------------------

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        persistent: bool = True,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        message = aio_pika.Message(
            body,
            content_type="application/json",
            headers=headers or {},
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        await self._exchanges[exchange].publish(message, routing_key=routing_key)

    async def publish_event(self, run_id: str, body: bytes, *, patience: float = PUBLISH_PATIENCE_SECONDS) -> None:
        """Lifecycle events must arrive: retried through a reconnect (consumers dedupe by seq)."""
        await self.publish_until_confirmed(EVENTS, f"run.{run_id}", body, patience=patience)

    async def publish_until_confirmed(
        self, exchange: str, routing_key: str, body: bytes, *, patience: float = PUBLISH_PATIENCE_SECONDS
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        delay = 0.1
        while True:
            try:
                await self.publish(exchange, routing_key, body)
                return
            except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                if loop.time() + delay > deadline:
                    raise BrokerError(f"could not publish to {exchange} for {patience:g} s: {exc!r}") from exc
                log.warning("publish to %s failed (%r); retrying in %.1f s", exchange, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def publish_heartbeat(self, body: bytes) -> None:
        await self.publish(HEARTBEATS, "hb", body, persistent=False)

    async def publish_command(self, key: str, body: bytes) -> None:
        await self.publish(COMMANDS, key, body)

    async def publish_status(self, routing_key: str, body: bytes, message_id: str) -> None:
        await self.publish(STATUS, routing_key, body, message_id=message_id)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy the message to runherd.dead with the reason, then drop the original."""
        headers = dict(delivery.headers)
        headers[ERROR_HEADER] = reason[:4000]
        headers["x-runherd-routing-key"] = delivery.routing_key
        await self.publish(DEAD, delivery.routing_key, delivery.body, headers=headers)
        await delivery.message.ack()
        log.warning("dead-lettered message (routing key %s): %s", delivery.routing_key, reason)

    # --- consuming -----------------------------------------------------------------------

    async def batches(
        self,
        queue_name: str,
        *,
        max_size: int,
        max_wait: float,
        prefetch: int | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[list[Delivery]]:
        """Deliveries in batches: up to ``max_size``, or whatever came within ``max_wait`` seconds
        of the first. Ends when ``stop`` is set (after the batch in hand)."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch or max_size * 2)
        queue: AbstractQueue = await channel.get_queue(queue_name, ensure=False)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        # A lost channel is not left to aio-pika's restore (which can silently fail): we raise, and
        # the caller's retry loop consumes again on a fresh channel once the connection is back.
        # Unacked deliveries of the lost channel are redelivered by RabbitMQ; handlers are idempotent.
        lost = asyncio.Event()
        channel.close_callbacks.add(lambda *_: lost.set())
        tag = await queue.consume(inbox.put)
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                batch = await _gather(inbox, max_size, max_wait, stop, lost)
                if lost.is_set():
                    raise BrokerError(f"consumer channel of {queue_name} closed")
                if batch:
                    yield [Delivery(m.body, m.routing_key or "", dict(m.headers or {}), m) for m in batch]
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            # Unacked messages still in the inbox go back to the queue when the channel closes.
            with contextlib.suppress(Exception):
                await channel.close()

    async def ack(self, deliveries: list[Delivery]) -> None:
        """Ack a batch with one frame when it can: deliveries of one consumer channel, settled in
        order, so everything up to the newest tag is this batch (dead-lettered and requeued ones
        were settled before, one by one)."""
        if not deliveries:
            return
        channels = {id(d.message.channel) for d in deliveries}
        if len(channels) == 1 and len(deliveries) > 1:
            newest = max(deliveries, key=lambda d: d.message.delivery_tag or 0)
            await newest.message.ack(multiple=True)
            return
        for delivery in deliveries:
            await delivery.message.ack()

    async def requeue(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            with contextlib.suppress(Exception):
                await delivery.message.nack(requeue=True)

    async def subscribe(self, exchange: str, binding: str) -> AsyncIterator[Delivery]:
        """A private auto-delete queue bound to ``exchange`` (for `runherd watch` and tests)."""
        channel = await self.connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=binding)
        try:
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    yield Delivery(message.body, message.routing_key or "", dict(message.headers or {}), message)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def queue_depths(self) -> dict[str, int]:
        depths = {}
        for name in _QUEUES:
            with contextlib.suppress(Exception):
                queue = await self.channel.get_queue(name, ensure=False)
                result = await queue.declare()  # a fresh passive-style declare: current counts
                depths[name] = result.message_count or 0
        return depths


async def _gather(
    inbox: asyncio.Queue[AbstractIncomingMessage],
    max_size: int,
    max_wait: float,
    stop: asyncio.Event,
    lost: asyncio.Event,
) -> list[AbstractIncomingMessage]:
    stopper = asyncio.ensure_future(stop.wait())
    loser = asyncio.ensure_future(lost.wait())
    getter = asyncio.ensure_future(inbox.get())
    try:
        await asyncio.wait({stopper, getter, loser}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        loser.cancel()
    if not getter.done():
        getter.cancel()
        return []
    batch = [getter.result()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait
    while len(batch) < max_size:
        try:
            batch.append(inbox.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(inbox.get(), remaining))
        except TimeoutError:
            break
    return batch
