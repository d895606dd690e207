"""Wiring: builds a service from the config and runs it until SIGTERM. Used by the CLI and tests."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

from runherd import broker as topology
from runherd import launchers, metrics, outbox, probes
from runherd.broker import Broker
from runherd.config import Config
from runherd.launchers import RunLauncher
from runherd.runtime import Supervisor, install_signal_handlers
from runherd.store import Store

log = logging.getLogger("runherd")

SERVICES = ("launcher", "heartbeat", "monitor")
# The queue each service consumes: /readyz wants a consumer on it.
CONSUMES = {
    "launcher": topology.COMMANDS_QUEUE,
    "heartbeat": topology.HEARTBEATS_QUEUE,
    "monitor": topology.EVENTS_QUEUE,
}


@dataclass
class Running:
    """Services running in this process: stop them with ``await running.close()``."""

    supervisor: Supervisor
    stores: list[Store] = field(default_factory=list)
    brokers: list[Broker] = field(default_factory=list)
    launchers: list[RunLauncher] = field(default_factory=list)
    services: dict[str, list[object]] = field(default_factory=dict)
    # (service, its store, its broker) per replica, for /readyz
    replicas: list[tuple[str, Store, Broker]] = field(default_factory=list)

    async def observe(self) -> list[probes.Observation]:
        """What /readyz decides on: each replica's broker connection, database and consumer."""
        seen = []
        for i, (name, store, broker) in enumerate(self.replicas):
            error = ""
            try:
                await store.ping()
            except Exception as exc:
                error = repr(exc)[:200]
            queue = CONSUMES[name]
            seen.append(
                probes.Observation(
                    service=f"{name}#{i}",
                    broker_connected=broker.connected,
                    database_ok=not error,
                    consuming=broker.consuming.get(queue, 0) > 0,
                    queue=queue,
                    database_error=error,
                )
            )
        return seen

    async def not_ready(self) -> list[str]:
        if self.supervisor.stop.is_set():
            return ["stopping"]
        return probes.not_ready(await self.observe(), started=bool(self.replicas))

    async def close(self, grace: float = 10.0) -> None:
        """Graceful, in a fixed order: stop consuming and finish the batches in hand (the rest go
        back to their queues unacked), flush the status outbox, then close the connections."""
        self.supervisor.stop.set()
        for name, _, _ in self.replicas:
            metrics.SERVICE_REPLICAS.labels(name).dec()
        self.replicas.clear()
        await self.supervisor.wait(grace)
        if self.stores and self.brokers:
            await outbox.flush(self.stores[0], self.brokers[0])
        for launcher in self.launchers:
            await launcher.close()
        for broker in self.brokers:
            await broker.close()
        for store in self.stores:
            await store.close()


async def start(
    config: Config,
    services: dict[str, int],
    *,
    launcher: RunLauncher | None = None,
    supervisor: Supervisor | None = None,
) -> Running:
    """Start ``{"launcher": 1, "heartbeat": 1, "monitor": 2}`` in this process."""
    from runherd.heartbeat.service import HeartbeatService
    from runherd.launcher.service import LauncherService
    from runherd.monitor.service import MonitorService

    running = Running(supervisor or Supervisor())
    launcher = launcher or launchers.build(config.run_launcher)
    running.launchers.append(launcher)
    relay_started = False
    for name, count in services.items():
        for _ in range(count):
            store = await Store.connect(config.database_url)
            broker = await Broker.connect(
                config.amqp_url,
                max_body_bytes=config.limits.max_message_bytes,
                event_shards=config.event_shards,
                name=f"runherd-{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            )
            running.stores.append(store)
            running.brokers.append(broker)
            service: LauncherService | HeartbeatService | MonitorService
            if name == "launcher":
                service = LauncherService(config, store, broker, launcher)
                relay = not relay_started and not launcher.hosts_workers_in_process
                await service.run(running.supervisor, relay=relay)
                relay_started = relay_started or relay
            elif name == "heartbeat":
                service = HeartbeatService(store, broker)
                await service.run(running.supervisor)
            elif name == "monitor":
                service = MonitorService(config, store, broker, launcher)
                await service.run(running.supervisor, relay=not relay_started)
                relay_started = True
            else:
                raise ValueError(f"unknown service {name!r}")
            running.services.setdefault(name, []).append(service)
            running.replicas.append((name, store, broker))
            metrics.SERVICE_REPLICAS.labels(name).inc()
            metrics.touch(name, CONSUMES[name], launcher.name)
    return running


async def serve(config: Config, services: dict[str, int]) -> int:
    """Run until SIGTERM/SIGINT; exit code 1 if a task crashed."""
    supervisor = Supervisor()
    install_signal_handlers(supervisor.stop)
    holder: list[Running] = []

    async def not_ready() -> list[str]:
        return await holder[0].not_ready() if holder else ["starting: services not connected yet"]

    http = await probes.serve(config.metrics_port, not_ready) if config.metrics_port else None
    lag = asyncio.ensure_future(probes.watch_loop_lag()) if http is not None else None
    unwatch_gc = probes.watch_gc_pauses() if http is not None else None
    running = await start(config, services, supervisor=supervisor)
    holder.append(running)
    log.info(
        "runherd %s running (launcher: %s)",
        ", ".join(f"{n}x{c}" for n, c in services.items()),
        running.launchers[0].name,
    )
    await supervisor.stop.wait()
    log.info("stopping")
    await running.close()
    if lag is not None:
        lag.cancel()
    if unwatch_gc is not None:
        unwatch_gc()
    if http is not None:
        http.close()
    return 1 if supervisor.failure else 0
