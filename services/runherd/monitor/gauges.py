"""The gauges a monitor refreshes once a poll interval: runs by status, queue depths (ready plus
unacknowledged, from the management API), the oldest eligible QUEUED run, the outbox backlog and
how far behind the monitor hears the workers."""

from __future__ import annotations

import asyncio
import logging
import math

from runherd import broker as topology
from runherd import metrics, rabbit_admin
from runherd.broker import Broker
from runherd.config import Config
from runherd.runtime import sleep_or_stop
from runherd.store import Store

log = logging.getLogger("runherd.monitor")

QUEUES = {topology.COMMANDS_QUEUE, topology.EVENTS_QUEUE, topology.HEARTBEATS_QUEUE, topology.DEAD_QUEUE}


class Gauges:
    def __init__(self, config: Config, store: Store, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self.endpoint = rabbit_admin.endpoint(
            config.amqp_url,
            config.rabbitmq_management_url,
            ca_file=config.amqp_tls.ca_file,
            verify=config.amqp_tls.verify,
        )
        self._warned = False
        # Sharded event ingest: each shard's queue has its depth too.
        self.queues = QUEUES | {
            topology.shard_queue(i) for i in range(config.event_shards if config.event_shards > 1 else 0)
        }

    async def loop(self, interval: float, stop: asyncio.Event) -> None:
        """Refresh every ``interval`` seconds until stop; a failed round is logged, not fatal."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("gauges not refreshed: %r", exc)
            await sleep_or_stop(stop, interval)

    async def refresh(self) -> None:
        counts = await self.store.count_active()
        for status in ("QUEUED", "STARTING", "STARTED", "CANCELING"):
            metrics.RUNS_BY_STATUS.labels(status).set(counts.get(status, 0))
        ops = await self.store.ops_gauges()
        metrics.OLDEST_QUEUED.set(ops.get("oldest_queued_seconds") or 0.0)
        metrics.OUTBOX_BACKLOG.set(ops.get("outbox_backlog") or 0.0)
        lag = ops.get("heard_through_lag_seconds")
        metrics.HEARD_THROUGH_LAG.set(math.inf if lag is None else max(0.0, lag))
        await self.refresh_queues()

    async def refresh_queues(self) -> None:
        try:
            queues = await rabbit_admin.queue_counts(self.endpoint, self.queues)
        except (OSError, ValueError) as exc:
            # Without the management plugin only the ready messages can be counted (AMQP).
            if not self._warned:
                log.warning(
                    "RabbitMQ management API at %s unreachable (%r): queue depth counts ready messages only",
                    self.endpoint.base,
                    exc,
                )
                self._warned = True
            ready = await self.broker.queue_depths()
            queues = {name: rabbit_admin.QueueCounts(n, 0) for name, n in ready.items()}
        for name, c in queues.items():
            metrics.QUEUE_DEPTH.labels(name).set(c.depth)
            metrics.QUEUE_MESSAGES.labels(name, "ready").set(c.ready)
            metrics.QUEUE_MESSAGES.labels(name, "unacked").set(c.unacked)
