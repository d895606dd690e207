"""What a worker says on the broker: its lifecycle events (numbered per attempt) and heartbeats.

Shared by the real worker (``runherd worker``) and the sim launcher's virtual workers, so a
simulated fleet speaks exactly the protocol real workers do and cannot drift from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from runherd.broker import Broker
from runherd.contract import Event, EventType, heartbeat_body, now_iso
from runherd.plan import Plan

log = logging.getLogger("runherd.worker")


class HeartbeatSink(Protocol):
    async def publish_heartbeat(self, body: bytes, *, token: str | None = None) -> None: ...


class Reporter:
    """Publishes one attempt's events (with confirms) and its heartbeats."""

    def __init__(
        self,
        broker: Broker,
        plan: Plan,
        *,
        on_beat: Callable[[], object] | None = None,
        quiet: bool = False,
        beats: HeartbeatSink | None = None,
    ) -> None:
        self.broker = broker
        # Heartbeats may go another way than events: a channel without publisher confirms (a lost
        # heartbeat is fine), shared by the workers of one connection (the sim fleet).
        self.beats: HeartbeatSink = beats or broker
        self.plan = plan
        self.seq = 0
        self._lock = asyncio.Lock()
        self._on_beat = on_beat
        self._quiet = quiet  # thousands of virtual workers in one process do not log every event

    async def emit(
        self,
        kind: EventType,
        *,
        step_key: str | None = None,
        message: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        async with self._lock:  # sequence numbers follow publish order
            self.seq += 1
            event = Event(
                run_id=self.plan.run_id,
                attempt=self.plan.attempt,
                seq=self.seq,
                type=kind,
                source=self.plan.source,
                step_key=step_key,
                message=message,
                data=data or {},
                ts=now_iso(),
            )
            await self.broker.publish_event(
                self.plan.run_id, event.body(), token=self.plan.token, shards=self.plan.event_shards
            )
        (log.debug if self._quiet else log.info)(
            "%s run_id=%s attempt=%s step=%s %s",
            kind.value,
            self.plan.run_id,
            self.plan.attempt,
            step_key or "-",
            message or "",
        )

    # --- the lifecycle, as the worker tells it ---------------------------------------------------

    async def run_start(self, pid: int, *, what: str = "worker") -> None:
        reused = sorted(self.plan.completed)
        await self.emit(
            EventType.RUN_START,
            message=f"{what} pid {pid}, executor {self.plan.executor}"
            + (f"; reusing completed steps: {', '.join(reused)}" if reused else ""),
            data={
                "pid": pid,
                "reused": reused,
                "executor": self.plan.executor,
                "max_concurrent": self.plan.max_concurrent_steps,
            },
        )

    async def step_start(self, key: str) -> None:
        await self.emit(EventType.STEP_START, step_key=key)

    async def step_success(self, key: str, output: Any) -> None:
        await self.emit(EventType.STEP_SUCCESS, step_key=key, data={"output": output, "try": 1})

    async def step_failure(self, key: str, error: str | None) -> None:
        await self.emit(EventType.STEP_FAILURE, step_key=key, message=error, data={"tries": 1})

    async def run_success(self) -> None:
        await self.emit(EventType.RUN_SUCCESS)

    async def run_failure(self, failed: dict[str, str]) -> None:
        described = ", ".join(f"{k} ({v})" for k, v in failed.items())
        data = {"failed_steps": sorted(failed)}
        await self.emit(EventType.RUN_FAILURE, message=f"step failed: {described}", data=data)

    async def run_canceled(self, why: str = "worker received SIGTERM") -> None:
        await self.emit(EventType.RUN_CANCELED, message=why)

    async def heartbeats(self, stop: asyncio.Event | None = None) -> None:
        """Every ``heartbeat_interval_seconds`` until cancelled (or ``stop`` is set: then it returns
        after the heartbeat in flight, never cancelling a publish); a lost heartbeat is fine."""
        stop = stop or asyncio.Event()
        # One waiter for the whole life, not a task per beat (wait_for's): thousands of virtual
        # workers in one process beat thousands of times a second.
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if self._on_beat is not None:
                    self._on_beat()
                with contextlib.suppress(Exception):
                    await self.beats.publish_heartbeat(
                        heartbeat_body(self.plan.run_id, self.plan.attempt), token=self.plan.token
                    )
                await asyncio.wait((stopped,), timeout=self.plan.heartbeat_interval_seconds)
        finally:
            stopped.cancel()
