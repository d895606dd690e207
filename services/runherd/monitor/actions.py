"""The monitor's hands: stopping workers, in batches, off the sweep's path, and saying truthfully so.

``terminate_soon`` only queues: the sweep that decided goes on at once. A few batch workers take
what is queued (up to ``BATCH`` at a time), stop those workers with one ``terminate_many`` (the
process launcher signals them all, then waits for every exit together) and record every outcome in
one transaction (shared/killing.py: ``kill_many``). A mass timeout of 1,000 runs is a handful of
batches, not 1,000 polls and 1,000 commits on the loop that runs the next sweep.

A worker this monitor's run launcher cannot reach (the process launcher's worker on another host, as
in compose.yaml) gets a ``kill`` request on ``runherd.commands``: the launcher service that owns it
stops it and records the outcome. Nothing here runs inside a transaction: the deciding transaction has
committed before any launcher call, so no run row is locked while a backend is slow. If this process
dies with work queued, the reap rule finds those workers again (their attempts are marked, their
claims expire).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from runherd import killing, metrics
from runherd.broker import Broker
from runherd.launchers import RunLauncher
from runherd.store import RunRef, Store

log = logging.getLogger("runherd.monitor.actions")

BATCH = 500  # workers stopped (and recorded) together
WORKERS = 4  # batches in flight at once: a worker that holds its grace period holds one batch only
MAX_PENDING = 100_000  # beyond this, terminations are left to the reap rule (their claims expire)

Item = tuple[RunRef, str, float | None]


class Actions:
    def __init__(
        self,
        store: Store,
        launcher: RunLauncher,
        broker: Broker | None = None,
        workers: int = WORKERS,
        batch: int = BATCH,
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.broker = broker
        self.batch = batch
        self._n_workers = workers
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    def terminate_soon(self, refs: list[RunRef], why: str, *, grace: float | None = None) -> None:
        """Queue these workers to be stopped and return at once: a worker that ignores SIGTERM holds
        its grace period, and that must not hold up the sweeps or the event ingest."""
        if self._closed:
            return
        dropped = 0
        for ref in refs:
            if not ref.handle:
                continue
            if self._queue.qsize() >= MAX_PENDING:
                dropped += 1
                continue
            self._queue.put_nowait((ref, why, grace))
        if dropped:
            log.warning("%d terminations left to the reap rule: %d already queued", dropped, MAX_PENDING)
        if not self._workers and not self._queue.empty():
            self._workers = [asyncio.ensure_future(self._work()) for _ in range(self._n_workers)]

    async def idle(self) -> None:
        """Wait until everything queued so far is carried out (tests, benchmarks)."""
        await self._queue.join()

    async def close(self) -> None:
        self._closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def terminate(self, refs: list[RunRef], why: str, *, grace: float | None = None) -> None:
        """Stop these workers now (in the caller's task) and log each outcome in its run's event log."""
        await self._carry_out([(r, why, grace) for r in refs if r.handle])

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._carry_out(batch)
            except Exception:
                log.exception("a batch of %d terminations failed; the reap rule tries again", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _carry_out(self, items: list[Item]) -> None:
        """Group by (why, grace): one terminate_many per group; the unreachable ones to their owner."""
        groups: dict[tuple[str, float | None], list[RunRef]] = defaultdict(list)
        for ref, why, grace in items:
            assert ref.handle is not None
            if self.launcher.can_reach(ref.handle):
                groups[(why, grace)].append(ref)
            else:
                await self._ask_owner(ref, why, grace)
        for (why, grace), refs in groups.items():
            verdicts = await killing.kill_many(self.launcher, self.store, refs, why, grace=grace, source="monitor")
            confirmed = sum(1 for v in verdicts if v.confirmed)
            if confirmed:
                metrics.MONITOR_ACTIONS.labels("terminate").inc(confirmed)

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
