"""The monitor's hands: terminating workers through the run launcher, bounded, and saying so."""

from __future__ import annotations

import asyncio
import logging

from runherd import metrics
from runherd.launchers import RunLauncher
from runherd.store import RunRef, Store

log = logging.getLogger("runherd.monitor.actions")


class Actions:
    def __init__(self, store: Store, launcher: RunLauncher, concurrency: int = 32) -> None:
        self.store = store
        self.launcher = launcher
        self._slots = asyncio.Semaphore(concurrency)
        self._background: set[asyncio.Task[None]] = set()

    def terminate_soon(self, refs: list[RunRef], why: str, *, grace: float | None = None) -> None:
        """Terminate in the background: a worker that ignores SIGTERM holds its grace period, and
        that must not hold up the sweeps or the event ingest. If this process dies first, the reap
        rule finds the worker again (its run is finished or its attempt superseded)."""
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
        """Terminate each worker (bounded concurrency) and log it in its run's event log."""
        refs = [r for r in refs if r.handle]
        if refs:
            await asyncio.gather(*(self._terminate_one(r, why, grace) for r in refs))

    async def _terminate_one(self, ref: RunRef, why: str, grace: float | None) -> None:
        assert ref.handle is not None
        async with self._slots:
            try:
                found = await self.launcher.terminate(ref.handle, grace_seconds=grace)
                health = await self.launcher.check_health(ref.handle)
            except Exception as exc:
                log.warning("terminate failed run_id=%s attempt=%s: %r", ref.run_id, ref.attempt, exc)
                return
        message = (
            f"terminated worker of attempt {ref.attempt}: {why}"
            if found
            else f"worker of attempt {ref.attempt} was already gone ({why})"
        )
        metrics.MONITOR_ACTIONS.labels("terminate").inc()
        log.info("%s run_id=%s attempt=%s", message, ref.run_id, ref.attempt)
        async with self.store.tx() as tx:
            await tx.log(
                [(ref.run_id, ref.attempt, message)],
                type_="WORKER_TERMINATED",
                source="monitor",
                data=[{"health": health.status.value, "exit_code": health.exit_code}],
            )
            if health.exited:
                await tx.record_exit(ref.run_id, ref.attempt, health.exit_code, "terminated by runherd")
