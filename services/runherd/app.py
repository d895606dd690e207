"""Wiring: builds a service from the config and runs it until SIGTERM. Used by the CLI and tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from runherd import launchers, metrics, outbox
from runherd.broker import Broker
from runherd.config import Config
from runherd.launchers import RunLauncher
from runherd.runtime import Supervisor, install_signal_handlers
from runherd.store import Store

log = logging.getLogger("runherd")

SERVICES = ("launcher", "heartbeat", "monitor")


@dataclass
class Running:
    """Services running in this process: stop them with ``await running.close()``."""

    supervisor: Supervisor
    stores: list[Store] = field(default_factory=list)
    brokers: list[Broker] = field(default_factory=list)
    launchers: list[RunLauncher] = field(default_factory=list)
    services: dict[str, list[object]] = field(default_factory=dict)

    async def close(self, grace: float = 10.0) -> None:
        """Graceful, in a fixed order: stop consuming and finish the batches in hand (the rest go
        back to their queues unacked), flush the status outbox, then close the connections."""
        self.supervisor.stop.set()
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
            broker = await Broker.connect(config.amqp_url, max_body_bytes=config.limits.max_message_bytes)
            running.stores.append(store)
            running.brokers.append(broker)
            service: LauncherService | HeartbeatService | MonitorService
            if name == "launcher":
                service = LauncherService(config, store, broker, launcher)
                await service.run(running.supervisor, relay=not relay_started)
                relay_started = True
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
    return running


async def serve(config: Config, services: dict[str, int]) -> int:
    """Run until SIGTERM/SIGINT; exit code 1 if a task crashed."""
    metrics.serve(config.metrics_port)
    supervisor = Supervisor()
    install_signal_handlers(supervisor.stop)
    running = await start(config, services, supervisor=supervisor)
    log.info(
        "runherd %s running (launcher: %s)",
        ", ".join(f"{n}x{c}" for n, c in services.items()),
        running.launchers[0].name,
    )
    await supervisor.stop.wait()
    log.info("stopping")
    await running.close()
    return 1 if supervisor.failure else 0
