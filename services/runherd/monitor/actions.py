"""The monitor's hands: stopping workers, bounded, in the background, and saying truthfully so.

A worker this monitor's run launcher can reach is terminated here (shared/killing.py records the
outcome). One it cannot reach (the process launcher's worker on another host, as in compose.yaml)
gets a ``kill`` request on ``runherd.commands``: the launcher service that owns it stops it and
records the outcome. Nothing here runs inside a transaction: the deciding transaction has
committed before any launcher call, so no run row is locked while a backend is slow.
"""

from __future__ import annotations

import asyncio
import logging

from runherd import killing, metrics
from runherd.broker import Broker
from runherd.launchers import RunLauncher
from runherd.store import RunRef, Store

log = logging.getLogger("runherd.monitor.actions")


class Actions:
    def __init__(
        self, store: Store, launcher: RunLauncher, broker: Broker | None = None, concurrency: int = 32
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.broker = broker
        self._slots = asyncio.Semaphore(concurrency)
        self._background: set[asyncio.Task[None]] = set()

    def terminate_soon(self, refs: list[RunRef], why: str, *, grace: float | None = None) -> None:
        """Terminate in the background: a worker that ignores SIGTERM holds its grace period, and
        that must not hold up the sweeps or the event ingest. If this process dies first, the reap
        rule finds the worker again (its attempt is marked, its claim expires)."""
        if not [r for r in refs if r.handle]:
            return
        task = asyncio.ensure_future(self.terminate(refs, why, grace=grace))
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background terminate failed: %r", task.exception())

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def terminate(self, refs: list[RunRef], why: str, *, grace: float | None = None) -> None:
        """Terminate each worker (bounded concurrency) and log the outcome in its run's event log."""
        refs = [r for r in refs if r.handle]
        if refs:
            await asyncio.gather(*(self._terminate_one(r, why, grace) for r in refs))

    async def _terminate_one(self, ref: RunRef, why: str, grace: float | None) -> None:
        assert ref.handle is not None
        async with self._slots:
            if not self.launcher.can_reach(ref.handle):
                await self._ask_owner(ref, why, grace)
                return
            result = await killing.kill(self.launcher, self.store, ref, why, grace=grace, source="monitor")
        if result.confirmed:
            metrics.MONITOR_ACTIONS.labels("terminate").inc()

    async def _ask_owner(self, ref: RunRef, why: str, grace: float | None) -> None:
        """The launcher service on the worker's host carries the kill out and records it."""
        assert ref.handle is not None
        host = ref.handle.get("host")
        if self.broker is None:
            message = f"could not terminate the worker of attempt {ref.attempt} ({why}): it runs on host {host}"
            await killing.record(self.store, ref, killing.Verdict(False, False, message), None, source="monitor")
            return
        await self.broker.publish_command(killing.KILL_KEY, killing.request_body(ref, why, grace))
        metrics.MONITOR_ACTIONS.labels("kill_request").inc()
        log.info(
            "asked the launcher on host %s to terminate run_id=%s attempt=%s (%s)", host, ref.run_id, ref.attempt, why
        )
