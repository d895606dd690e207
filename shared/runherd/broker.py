"""RabbitMQ for runherd: the only module that imports aio_pika.

It declares the public topology of DESIGN.md, publishes with publisher confirms, and hands
consumers their deliveries in batches. Settling (ack, requeue, dead-letter) happens in one place, the
consume loop of ``runherd.consume``, which calls the primitives here; services never see an aio-pika
message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
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

from runherd.auth import TOKEN_HEADER
from runherd.config import redact
from runherd.contract import SHARD_HEADER, event_shard
from runherd.errors import RunherdError
from runherd.limits import DEFAULT as DEFAULT_LIMITS

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
# Sharded event ingest (event_shards > 1): runherd.events feeds a headers exchange that routes on
# the shard header to runherd.events.shard.<i>; a message without it (or with a shard out of range)
# goes on to the alternate exchange and the events queue as before.
SHARDS_EXCHANGE = "runherd.events.shards"
UNSHARDED_EXCHANGE = "runherd.events.unsharded"


def shard_queue(shard: int) -> str:
    return f"runherd.events.shard.{shard}"


ERROR_HEADER = "x-runherd-error"
EXCHANGE_HEADER = "x-runherd-exchange"
ROUTING_KEY_HEADER = "x-runherd-routing-key"
BODY_BYTES_HEADER = "x-runherd-body-bytes"
# A dead letter of a message refused for its size keeps only its head: republishing the whole body
# would hold it in memory a second time, and the head is enough to tell what it was.
OVERSIZED_HEAD_BYTES = 64 * 1024

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
    """A received message as handlers see it: its body and the facts about it, never the means to
    settle it (only ``runherd.consume`` settles)."""

    body: bytes
    routing_key: str
    headers: dict[str, Any]
    _raw: AbstractIncomingMessage

    @property
    def message_id(self) -> str | None:
        return self._raw.message_id

    @property
    def exchange(self) -> str:
        return self._raw.exchange or ""

    @property
    def settleable(self) -> bool:
        """False once the channel it came on is gone (RabbitMQ then redelivers it elsewhere)."""
        channel = self._raw.channel
        return not getattr(channel, "is_closed", False)

    @property
    def deliveries(self) -> int:
        """How many times RabbitMQ has delivered this message (quorum queues count)."""
        count = self.headers.get("x-delivery-count")
        return int(count) + 1 if isinstance(count, int) else (2 if self._raw.redelivered else 1)


class Broker:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        max_body_bytes: int = DEFAULT_LIMITS.max_message_bytes,
        event_shards: int = 1,
    ) -> None:
        self.event_shards = event_shards  # the topology declared (README "Sharded event ingest")
        self.name: str | None = None  # the connection's name in RabbitMQ, if given
        self.connection = connection
        self.channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self.max_body_bytes = max_body_bytes  # consumers refuse larger bodies unparsed (runherd.consume)
        # queue name -> consumers of it on this connection that are registered right now (readyz)
        self.consuming: dict[str, int] = {}

    @property
    def connected(self) -> bool:
        """True while the AMQP connection is up (False during a reconnect)."""
        transport = self.connection.transport
        return not self.connection.is_closed and transport is not None and not transport.connection.is_closed

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        declare: bool = True,
        timeout: float = 10,
        max_body_bytes: int = DEFAULT_LIMITS.max_message_bytes,
        event_shards: int = 1,
        name: str | None = None,
    ) -> Broker:
        """``name``: the connection's name as RabbitMQ shows it (``connection_name``)."""
        properties: dict[str, Any] | None = {"connection_name": name} if name else None
        try:
            connection = await aio_pika.connect_robust(
                url, timeout=timeout, reconnect_interval=RECONNECT_SECONDS, client_properties=properties
            )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise BrokerError(f"cannot connect to RabbitMQ at {redact(url)}: {exc!r}") from exc
        channel = await connection.channel(publisher_confirms=True)
        broker = cls(connection, channel, max_body_bytes, event_shards)
        broker.name = name
        if declare:
            try:
                await broker.declare()
                return broker
            except aiormq.exceptions.ChannelAccessRefused:
                # A user that may not configure (a client's, README Security): the services have
                # declared the topology; the refusal closed the channel, so take a new one.
                log.debug("may not declare the topology as this user; using it as it is")
                broker.channel = await connection.channel(publisher_confirms=True)
        for name in _EXCHANGES:
            broker._exchanges[name] = await broker.channel.get_exchange(name, ensure=False)
        return broker

    async def sibling(self, *, confirms: bool = True) -> Broker:
        """Another Broker on this one's connection, with a channel (and publisher confirms, unless
        ``confirms`` is false: for heartbeats) of its own: many workers of one host can share a
        connection instead of opening one each."""
        channel = await self.connection.channel(publisher_confirms=confirms)
        other = Broker(self.connection, channel)
        for name in _EXCHANGES:
            other._exchanges[name] = await channel.get_exchange(name, ensure=False)
        return other

    async def close_channel(self) -> None:
        """Close this Broker's channel only (a sibling's), leaving the shared connection open."""
        with contextlib.suppress(Exception):
            await self.channel.close()

    async def declare_fanout(self, name: str) -> None:
        """A durable fanout exchange outside the public topology (the sim launcher's control)."""
        self._exchanges[name] = await self.channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)

    async def declare(self) -> None:
        """Declare the public topology; idempotent, every service does it at start."""
        for name, kind in _EXCHANGES.items():
            self._exchanges[name] = await self.channel.declare_exchange(name, kind, durable=True)
        # Sharded by a deployment: the events queue must not get events straight from runherd.events
        # again (a client or a service configured without shards declares too).
        sharded = self.event_shards > 1 or await self._exists(SHARDS_EXCHANGE)
        for queue, (arguments, exchange, keys) in _QUEUES.items():
            declared = await self.channel.declare_queue(queue, durable=True, arguments=arguments)
            if queue == EVENTS_QUEUE and sharded:
                continue
            for key in keys:
                await declared.bind(self._exchanges[exchange], routing_key=key)
        if self.event_shards > 1:
            await self._declare_shards()

    async def _exists(self, exchange: str) -> bool:
        channel = await self.connection.channel()
        try:
            await channel.declare_exchange(exchange, aio_pika.ExchangeType.HEADERS, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _declare_shards(self) -> None:
        """runherd.events -(run.*)-> runherd.events.shards (headers; alternate exchange
        runherd.events.unsharded -> the events queue) -(shard header = i)-> runherd.events.shard.<i>,
        each a quorum queue with a single active consumer. The new path is bound before the events
        queue's direct binding goes: a switch may duplicate an event (ingest dedupes), never lose one."""
        unsharded = await self.channel.declare_exchange(UNSHARDED_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        shards = await self.channel.declare_exchange(
            SHARDS_EXCHANGE,
            aio_pika.ExchangeType.HEADERS,
            durable=True,
            arguments={"alternate-exchange": UNSHARDED_EXCHANGE},
        )
        events_queue = await self.channel.get_queue(EVENTS_QUEUE, ensure=False)
        await events_queue.bind(unsharded, routing_key="")
        await shards.bind(self._exchanges[EVENTS], routing_key="run.*")
        arguments = _QUEUES[EVENTS_QUEUE][0]
        for shard in range(self.event_shards):
            declared = await self.channel.declare_queue(shard_queue(shard), durable=True, arguments=arguments)
            await declared.bind(shards, routing_key="", arguments={"x-match": "all", SHARD_HEADER: str(shard)})
        await events_queue.unbind(self._exchanges[EVENTS], routing_key="run.*")

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

    async def publish_event(
        self,
        run_id: str,
        body: bytes,
        *,
        token: str | None = None,
        patience: float = PUBLISH_PATIENCE_SECONDS,
        shards: int = 1,
    ) -> None:
        """Lifecycle events must arrive: retried through a reconnect (consumers dedupe by seq).
        ``token`` proves who reports (runherd.auth); it travels as a header, and so does the run's
        shard when events are sharded (``shards`` > 1: runherd.contract.event_shard)."""
        headers: dict[str, Any] = {TOKEN_HEADER: token} if token else {}
        if shards > 1:
            headers[SHARD_HEADER] = str(event_shard(run_id, shards))
        await self.publish_until_confirmed(EVENTS, f"run.{run_id}", body, patience=patience, headers=headers or None)

    async def publish_until_confirmed(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        patience: float = PUBLISH_PATIENCE_SECONDS,
        headers: dict[str, Any] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        delay = 0.1
        while True:
            try:
                await self.publish(exchange, routing_key, body, headers=headers)
                return
            except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                if loop.time() + delay > deadline:
                    raise BrokerError(f"could not publish to {exchange} for {patience:g} s: {exc!r}") from exc
                log.warning("publish to %s failed (%r); retrying in %.1f s", exchange, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def publish_heartbeat(self, body: bytes, *, token: str | None = None) -> None:
        await self.publish(HEARTBEATS, "hb", body, persistent=False, headers={TOKEN_HEADER: token} if token else None)

    async def send_heartbeat(self, body: bytes, *, token: str | None = None) -> None:
        """A heartbeat handed to the connection's writer without waiting for it to be written. For
        a channel without confirms shared by many workers: aiormq holds a channel's lock until its
        publish is written, so waiting would let the channel carry one heartbeat per loop iteration
        (50 workers sharing it, 50 iterations for a round of heartbeats)."""
        channel = await self.channel.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)  # the concrete channel takes ``wait``
        await channel.basic_publish(
            body,
            exchange=HEARTBEATS,
            routing_key="hb",
            properties=aiormq.spec.Basic.Properties(
                content_type="application/json", delivery_mode=1, headers={TOKEN_HEADER: token} if token else {}
            ),
            wait=False,
        )

    async def publish_command(self, key: str, body: bytes) -> None:
        await self.publish(COMMANDS, key, body)

    async def publish_status(self, routing_key: str, body: bytes, message_id: str) -> None:
        await self.publish(STATUS, routing_key, body, message_id=message_id)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy the message to runherd.dead with every AMQP property it came with, adding runherd's
        facts as ``x-runherd-*`` headers (error, original exchange and routing key), then drop the
        original. ``user_id`` and ``expiration`` move into headers: RabbitMQ refuses a ``user_id``
        that is not the publisher's, and an expiring dead letter would vanish before anyone read it."""
        raw = delivery._raw
        headers = dict(delivery.headers)
        headers.pop(TOKEN_HEADER, None)  # a valid token is a credential: it does not go on
        headers[ERROR_HEADER] = reason[:4000]
        headers[EXCHANGE_HEADER] = raw.exchange or ""
        headers[ROUTING_KEY_HEADER] = delivery.routing_key
        if raw.user_id:
            headers["x-runherd-user-id"] = raw.user_id
        if raw.expiration is not None:
            headers["x-runherd-expiration"] = str(raw.expiration)
        body = delivery.body
        if len(body) > self.max_body_bytes:
            headers[BODY_BYTES_HEADER] = len(body)
            body = body[:OVERSIZED_HEAD_BYTES]
        copy = aio_pika.Message(
            body,
            headers=headers,
            content_type=raw.content_type,
            content_encoding=raw.content_encoding,
            delivery_mode=raw.delivery_mode or aio_pika.DeliveryMode.PERSISTENT,
            priority=raw.priority,
            correlation_id=raw.correlation_id,
            reply_to=raw.reply_to,
            message_id=raw.message_id,
            timestamp=raw.timestamp,
            type=raw.type,
            app_id=raw.app_id,
        )
        await self._exchanges[DEAD].publish(copy, routing_key=delivery.routing_key)
        await raw.ack()
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
        hand_back: bool = False,
    ) -> AsyncIterator[list[Delivery]]:
        """Deliveries in batches: up to ``max_size``, or whatever came within ``max_wait`` seconds
        of the first. Ends when ``stop`` is set (after the batch in hand). ``hand_back``: end by
        closing the channel without a basic.cancel first, so a single-active-consumer queue takes
        back what was prefetched before it activates the next consumer (an event shard that moves
        keeps its order)."""
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
        self.consuming[queue_name] = self.consuming.get(queue_name, 0) + 1
        try:
            while not stop.is_set():
                batch = await _gather(inbox, max_size, max_wait, stop, lost)
                if lost.is_set():
                    raise BrokerError(f"consumer channel of {queue_name} closed")
                if batch:
                    yield [Delivery(m.body, m.routing_key or "", dict(m.headers or {}), m) for m in batch]
        finally:
            self.consuming[queue_name] -= 1
            if not hand_back:
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
        channels = {id(d._raw.channel) for d in deliveries}
        if len(channels) == 1 and len(deliveries) > 1:
            newest = max(deliveries, key=lambda d: d._raw.delivery_tag or 0)
            await newest._raw.ack(multiple=True)
            return
        for delivery in deliveries:
            await delivery._raw.ack()

    async def requeue(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            with contextlib.suppress(Exception):
                await delivery._raw.nack(requeue=True)

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

    async def follow(self, exchange: str, bindings: list[str]) -> Subscription:
        """A private queue (exclusive, auto-delete, named here: aio-pika cannot re-declare a
        server-named one) bound to ``exchange``, consumed without acks. Bound when this returns,
        so nothing published afterwards is missed while the connection lasts. When the connection
        is lost the queue is gone with it and the subscription raises BrokerError: the caller
        follows again once reconnected (the client's ``statuses()`` does)."""
        channel = await self.connection.channel()
        inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        channel.close_callbacks.add(lambda *_: inbox.put_nowait(None))
        queue = await channel.declare_queue(f"runherd.follow.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        for binding in bindings:
            await queue.bind(exchange, routing_key=binding)
        await queue.consume(inbox.put, no_ack=True)
        return Subscription(channel, inbox)

    async def queue_stats(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, by a passive declare; None if it does not exist."""
        channel = await self.connection.channel()
        try:
            result = await channel.declare_queue(name, passive=True)
            declared = result.declaration_result
            return declared.message_count or 0, declared.consumer_count or 0
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def peek(self, name: str, limit: int) -> list[Peeked]:
        """Up to ``limit`` messages from the head of a queue, left in it: each is taken with basic.get
        and never acked, and closing the channel returns them all, in order (for the UI's dead
        letters). They are redelivered, not removed; a quorum queue counts the delivery."""
        channel = await self.connection.channel()
        found: list[Peeked] = []
        try:
            queue = await channel.get_queue(name, ensure=False)
            for _ in range(limit):
                message = await queue.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                found.append(
                    Peeked(
                        message.body,
                        message.routing_key or "",
                        {k: _plain(v) for k, v in (message.headers or {}).items()},
                        message.message_id,
                        message.timestamp,
                    )
                )
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return found

    async def queue_depths(self) -> dict[str, int]:
        depths = {}
        shards = [shard_queue(i) for i in range(self.event_shards)] if self.event_shards > 1 else []
        for name in [*_QUEUES, *shards]:
            with contextlib.suppress(Exception):
                queue = await self.channel.get_queue(name, ensure=False)
                result = await queue.declare()  # a fresh passive-style declare: current counts
                depths[name] = result.message_count or 0
        return depths


@dataclass(frozen=True)
class Peeked:
    body: bytes
    routing_key: str
    headers: dict[str, Any]
    message_id: str | None
    timestamp: Any


def _plain(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Received:
    body: bytes
    routing_key: str
    message_id: str | None


class Subscription:
    """What ``Broker.follow`` returns: an async iterator of Received, until its channel is lost."""

    def __init__(self, channel: AbstractChannel, inbox: asyncio.Queue[AbstractIncomingMessage | None]) -> None:
        self._channel = channel
        self._inbox = inbox

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Received:
        message = await self._inbox.get()
        if message is None:
            self._inbox.put_nowait(None)  # stays lost for every later call
            raise BrokerError("subscription lost: the connection to RabbitMQ was closed")
        return Received(message.body, message.routing_key or "", message.message_id)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._channel.close()


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
