"""The monitor's hands: terminating workers through the run launcher, bounded, and saying so."""

from __future__ import annotations

import asyncio
import logging

from shared import metrics
from shared.launchers import RunLauncher
from shared.store import RunRef, Store

log = logging.getLogger("runherd.monitor.actions")


class Actions:
    def __init__(self, store: Store, launcher: RunLauncher, concurrency: int = 32) -> None:
        self.store = store
        self.launcher = launcher
        self._slots = asyncio.Semaphore(concurrency)

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
        message = f"terminated worker of attempt {ref.attempt}: {why}" if found else \
            f"worker of attempt {ref.attempt} was already gone ({why})"
        metrics.MONITOR_ACTIONS.labels("terminate").inc()
        log.info("%s run_id=%s attempt=%s", message, ref.run_id, ref.attempt)
        async with self.store.tx() as tx:
            await tx.log([(ref.run_id, ref.attempt, message)], type_="WORKER_TERMINATED", source="monitor",
                         data=[{"health": health.status.value, "exit_code": health.exit_code}])
            if health.exited:
                await tx.record_exit(ref.run_id, ref.attempt, health.exit_code, "terminated by runherd")
