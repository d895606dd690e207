"""Live updates: one subscription to the `runherd.status` topic per UI process, fanned out to every
open page as server-sent events.

The hub follows `#` on runherd.status through a private queue (``Broker.follow``); each browser
connection gets a small queue of its own, filtered by run id when it watches one run. A slow
browser loses its oldest messages rather than holding the others back; a page refetches its data
on every message, so a lost one costs nothing but a moment. When RabbitMQ goes away the hub
follows again once it is back, and tells the pages (``event: reconnected``) so they refetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import orjson

from runherd.broker import STATUS, Broker, BrokerError

log = logging.getLogger("runherd.ui")

CLIENT_QUEUE = 100
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0


@dataclass(eq=False)
class Listener:
    run_id: str | None = None
    queue: asyncio.Queue[tuple[str, bytes]] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))

    def offer(self, kind: str, body: bytes) -> None:
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait((kind, body))


class Hub:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.listeners: set[Listener] = set()
        self.connected = asyncio.Event()
        self.received = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def close(self) -> None:
        """Stop following, and end every open event stream (so the server can stop at once)."""
        for listener in list(self.listeners):
            listener.offer("close", b"{}")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def listen(self, run_id: str | None = None) -> Listener:
        listener = Listener(run_id)
        self.listeners.add(listener)
        return listener

    def leave(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    def publish(self, body: bytes) -> None:
        """Hand one status message to every listener it concerns."""
        self.received += 1
        try:
            run_id = str(orjson.loads(body).get("run_id"))
        except (orjson.JSONDecodeError, AttributeError):
            return
        for listener in list(self.listeners):
            if listener.run_id is None or listener.run_id == run_id:
                listener.offer("status", body)

    async def _follow(self) -> None:
        first = True
        delay = RETRY_SECONDS
        while True:
            try:
                subscription = await self.broker.follow(STATUS, ["#"])
            except Exception as exc:  # the exchange not declared yet (no service ran), or the broker away
                self.connected.clear()
                log.warning("cannot follow %s (%r); again in %.0f s", STATUS, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
                continue
            delay = RETRY_SECONDS
            self.connected.set()
            if not first:
                for listener in list(self.listeners):
                    listener.offer("reconnected", b"{}")
            first = False
            try:
                async for received in subscription:
                    self.publish(received.body)
            except BrokerError as exc:
                self.connected.clear()
                log.warning("status subscription lost (%s); following again", exc)
            finally:
                await subscription.close()
            await asyncio.sleep(RETRY_SECONDS)
