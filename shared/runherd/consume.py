"""The one place a message is settled: a consume loop whose handlers return verdicts.

A handler gets a batch of deliveries and returns one verdict per delivery:

* ``APPLIED``: done (or a redelivery that changed nothing) -> ack;
* ``Retry(reason)``: it failed unexpectedly -> requeued, and dead-lettered with the reason at its
  last delivery, so a poison message cannot loop forever;
* ``Reject(reason)``: it breaks the contract -> dead-lettered at once with the reason.

A body over the broker's ``max_body_bytes`` (``limits.max_message_bytes``) never reaches a handler:
it is rejected here, unparsed.

A handler that raises one of the ``unavailable`` errors (the database is restarting, unreachable or
out of connections, a deadlock) has applied nothing: the loop keeps the whole batch unacked, stops
taking new deliveries and calls the handler again with the same batch after a jittered backoff.
Holding, rather than requeueing, is what keeps an outage from spending the delivery attempts that
RabbitMQ counts against ``x-delivery-limit``: a 60 s database outage dead-letters nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from runherd import metrics
from runherd.broker import MAX_DELIVERIES, Broker, BrokerError, Delivery
from runherd.limits import oversized
from runherd.runtime import sleep_or_stop

log = logging.getLogger("runherd.consume")


@dataclass(frozen=True)
class Applied:
    pass


@dataclass(frozen=True)
class Retry:
    reason: str


@dataclass(frozen=True)
class Reject:
    reason: str


Verdict = Applied | Retry | Reject
APPLIED = Applied()

BatchHandler = Callable[[list[Delivery]], Awaitable[Sequence[Verdict]]]

# The hold's backoff: the first retry after ~0.2 s, doubling to at most 5 s, each with jitter so
# that every replica does not hit a recovering database at the same instant.
HOLD_FIRST_SECONDS = 0.2
HOLD_MAX_SECONDS = 5.0


def hold_delay(tries: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before calling the handler again after ``tries`` unavailable failures."""
    ceiling = min(HOLD_MAX_SECONDS, HOLD_FIRST_SECONDS * 2 ** max(0, tries - 1))
    return ceiling * (rng or random).uniform(0.5, 1.0)


async def consume(
    broker: Broker,
    queue: str,
    handler: BatchHandler,
    *,
    stop: asyncio.Event,
    max_size: int,
    max_wait: float,
    unavailable: tuple[type[BaseException], ...] = (),
    prefetch: int | None = None,
    hand_back: bool = False,
) -> None:
    """Consume ``queue`` until ``stop``; every delivery is settled here and nowhere else."""
    async for batch in broker.batches(
        queue, max_size=max_size, max_wait=max_wait, prefetch=prefetch, stop=stop, hand_back=hand_back
    ):
        batch = await _refuse_oversized(broker, queue, batch)
        if not batch:
            continue
        verdicts = await _verdicts(queue, handler, batch, stop, unavailable)
        if verdicts is None:
            return  # stopped while holding: the channel closes and RabbitMQ requeues the batch
        await settle(broker, queue, batch, verdicts)


async def _refuse_oversized(broker: Broker, queue: str, batch: list[Delivery]) -> list[Delivery]:
    """Dead-letters the bodies over the size limit, before anything parses them; returns the rest."""
    refused = [(d, oversized(len(d.body), broker.max_body_bytes)) for d in batch]
    dead = [(d, reason) for d, reason in refused if reason is not None]
    if not dead:
        return batch
    await settle(broker, queue, [d for d, _ in dead], [Reject(reason) for _, reason in dead])
    return [d for d, reason in refused if reason is None]


async def _verdicts(
    queue: str,
    handler: BatchHandler,
    batch: list[Delivery],
    stop: asyncio.Event,
    unavailable: tuple[type[BaseException], ...],
) -> Sequence[Verdict] | None:
    tries = 0
    while True:
        try:
            verdicts = await handler(batch)
        except asyncio.CancelledError:
            raise
        except unavailable as exc:
            tries += 1
            await _hold(queue, batch, stop, tries, exc)
            if stop.is_set():
                return None
            continue
        except Exception as exc:
            log.exception("handler of %s failed on a batch of %d", queue, len(batch))
            verdicts = [Retry(f"handler failed: {exc!r}")] * len(batch)
        if tries:
            metrics.CONSUMER_HELD.labels(queue).set(0)
            log.info("%s: the database is back after %d tries; batch of %d applied", queue, tries, len(batch))
        if len(verdicts) != len(batch):
            raise AssertionError(f"{queue}: handler returned {len(verdicts)} verdicts for {len(batch)} deliveries")
        return verdicts


async def _hold(queue: str, batch: list[Delivery], stop: asyncio.Event, tries: int, exc: BaseException) -> None:
    if not all(d.settleable for d in batch):
        # The channel went away while we held: RabbitMQ redelivers; consume again on a new channel.
        raise BrokerError(f"consumer channel of {queue} closed while its batch was held")
    delay = hold_delay(tries)
    metrics.CONSUMER_HELD.labels(queue).set(len(batch))
    log_ = log.warning if tries == 1 or tries % 10 == 0 else log.debug
    log_(
        "%s: database unavailable (%r); holding %d deliveries unacked, retry %d in %.2f s",
        queue,
        exc,
        len(batch),
        tries,
        delay,
    )
    await sleep_or_stop(stop, delay)


async def settle(broker: Broker, queue: str, batch: list[Delivery], verdicts: Sequence[Verdict]) -> None:
    """Dead-letter (their publisher confirms awaited together) and requeue, then ack the applied
    ones with one frame."""
    applied: list[Delivery] = []
    dead: list[tuple[Delivery, str]] = []
    for delivery, verdict in zip(batch, verdicts, strict=True):
        if isinstance(verdict, Applied):
            applied.append(delivery)
        elif isinstance(verdict, Reject):
            dead.append((delivery, verdict.reason))
        elif delivery.deliveries >= MAX_DELIVERIES - 1:
            dead.append((delivery, f"failed {delivery.deliveries} times: {verdict.reason}"))
        else:
            await broker.requeue([delivery])
    if dead:
        metrics.DEAD_LETTERS.labels(queue).inc(len(dead))
        await asyncio.gather(*(broker.dead_letter(delivery, reason) for delivery, reason in dead))
    await broker.ack(applied)


def each(handle: Callable[[Delivery], Awaitable[Verdict]]) -> BatchHandler:
    """A batch handler that handles its deliveries one after the other."""

    async def handler(batch: list[Delivery]) -> list[Verdict]:
        return [await handle(delivery) for delivery in batch]

    return handler
