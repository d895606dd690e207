"""The monitor's sweeps. Each rule finds its violators with one indexed query (rows locked with
SKIP LOCKED, so replicas share the work) and acts on them as a compare-and-set. Timeouts are
decided in seconds in the SQL of shared/store/queries.sql: stuck_starting, stuck_canceling,
over_max_runtime, silent_workers, claim_reaps.

A sweep first reads every rule's deadline in one statement (rule_deadlines) and runs only the rules
that are due (shared/rules/sweeps.py); the same deadlines tell the loop how long to sleep. In the
steady state of a large fleet a sweep is that statement and the reap claim.

Decide, commit, then act: a rule's transaction makes its transitions and marks the workers to stop
(shared/store/kills.py: ``claim``) and commits; only then are workers terminated (by Actions, in
the background), and each outcome is recorded in its own short transaction. No launcher call (a
Docker or Kubernetes API over HTTP) ever runs while a run row is locked, so event ingest never
waits on a slow backend.

With ``run_monitoring.enabled: false`` the four monitoring rules are off; the reap rule and
retries still run (they enforce decisions already made: a finished run's worker must stop, a
failed run with retries left is retried)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from runherd import metrics
from runherd.config import Config
from runherd.contract import RunStatus
from runherd.launchers import RunLauncher
from runherd.monitor.actions import Actions
from runherd.monitor.ingest import crash
from runherd.monitor.retries import retry_failed_runs
from runherd.rules.sweeps import (
    Deadlines,
    StartedPass,
    due_rules,
    is_deaf,
    keep_pass,
    reuse_pass,
    sleep_seconds,
)
from runherd.store import Store
from runherd.store import kills as kill_store

log = logging.getLogger("runherd.monitor.sweeper")

BATCH = 1000
MAX_BATCHES = 50  # per rule and sweep: a backlog of violators is cleared in one sweep, bounded
# A worker whose run never started has nothing to save: a start timeout kills it without a grace.
# (Smaller transactions, so that the first kills overlap the next one, were slower: the kills' CPU
# shares the event loop the next transaction's results wait on.)
START_TIMEOUT_GRACE = 0.0


class Sweeper:
    def __init__(self, config: Config, store: Store, launcher: RunLauncher, actions: Actions) -> None:
        self.config = config
        self.mon = config.run_monitoring
        self.store = store
        self.launcher = launcher
        self.actions = actions
        self._deaf = False  # the heartbeat pipeline is not heard: the hang rule holds
        self._last: Deadlines | None = None  # the deadlines last read
        self._read_at = 0.0  # when they were read (monotonic)
        self._acted = True  # the last sweep acted on a run: its deadlines have moved
        self._pass: StartedPass | None = None  # the last pass over the STARTED runs, while reusable
        self._pass_read_at = 0.0

    async def sweep(self) -> dict[str, int]:
        """The rules that are due, once each; returns how many runs each acted on.

        One statement reads every rule's deadline first (shared/rules/sweeps.py); only the rules
        with a violator then take their locking transaction. The reap claim (one indexed statement)
        always runs; retries run when a failed run awaits its decision."""
        began = time.perf_counter()
        rules: dict[str, Callable[[], Awaitable[int]]] = {}
        deadlines = None
        if self.mon.enabled:
            deadlines = await self._read_deadlines()
            self._say_if_deaf(deadlines)
            monitoring = {
                "start_timeout": self.start_timeout,
                "cancel_timeout": self.cancel_timeout,
                "max_runtime": self.max_runtime,
                "heartbeat_timeout": self.heartbeat_timeout,
            }
            rules |= {name: monitoring[name] for name in due_rules(deadlines)}
        rules["reap"] = self.reap
        if deadlines is None or deadlines.retries_pending:
            rules["retries"] = self.retries
        counts = {}
        for name, rule in rules.items():
            started = time.perf_counter()
            counts[name] = await rule()
            metrics.SWEEP_DURATION.labels(name).observe(time.perf_counter() - started)
        # Anything acted on moves the deadlines: the sleep is read afresh, not from this probe.
        self._acted = deadlines is None or any(counts.values())
        metrics.SWEEP_SECONDS.observe(time.perf_counter() - began)
        return counts

    async def _read_deadlines(self) -> Deadlines:
        mon = self.mon
        began = time.perf_counter()
        now = time.monotonic()
        cached = None
        last, kept = self._last, self._pass
        if kept is not None and last is not None and reuse_pass(last, now - self._read_at, now - self._pass_read_at):
            cached = kept
        deadlines = await self.store.rule_deadlines(
            mon.heartbeat_timeout_seconds,
            self.start_grace,
            mon.start_timeout_seconds,
            mon.cancel_timeout_seconds,
            mon.max_runtime_seconds,
            cached,
        )
        self._read_at = time.monotonic()
        self._last = deadlines
        found = deadlines.started
        if found is not None and found.read_afresh:
            self._pass = found if keep_pass(found) else None
            self._pass_read_at = self._read_at
        metrics.SWEEP_DURATION.labels("deadlines").observe(time.perf_counter() - began)
        return deadlines

    async def start_timeout(self) -> int:
        limit = self.mon.start_timeout_seconds
        return await self._timed_out(
            "stuck_starting",
            limit,
            RunStatus.STARTING,
            RunStatus.FAILURE,
            f"run did not start within {limit:g} s (start_timeout_seconds)",
            metric="start_timeout",
            why="start timeout",
            failure_kind="infrastructure",
            grace=START_TIMEOUT_GRACE,
        )

    async def cancel_timeout(self) -> int:
        """CANCELED, and the worker force-killed after the commit. The event log says
        WORKER_TERMINATED only once the launcher confirms the kill; a replica that dies before
        leaves the marked worker to the reap rule of another."""
        limit = self.mon.cancel_timeout_seconds
        return await self._timed_out(
            "stuck_canceling",
            limit,
            RunStatus.CANCELING,
            RunStatus.CANCELED,
            f"cancel did not finish within {limit:g} s: the worker is force-killed",
            metric="cancel_timeout",
            why=f"cancel did not finish within {limit:g} s",
            grace=0,
        )

    async def _timed_out(
        self,
        rule: str,
        limit: float,
        from_: RunStatus,
        to: RunStatus,
        reason: str,
        *,
        metric: str,
        why: str,
        failure_kind: str | None = None,
        grace: float | None = None,
    ) -> int:
        """One rule's violators moved in one transaction per BATCH with their workers claimed for
        a kill; the kills are queued after each commit. A full batch is followed by another at once
        (up to MAX_BATCHES), so 1,000 runs with the same deadline all move in this sweep."""
        total = 0
        for _ in range(MAX_BATCHES):
            fetched, moved = await self._timed_out_batch(
                rule, limit, from_, to, reason, metric=metric, why=why, failure_kind=failure_kind, grace=grace
            )
            total += moved
            if fetched < BATCH:
                break
        return total

    async def _timed_out_batch(
        self,
        rule: str,
        limit: float,
        from_: RunStatus,
        to: RunStatus,
        reason: str,
        *,
        metric: str,
        why: str,
        failure_kind: str | None,
        grace: float | None,
    ) -> tuple[int, int]:
        async with self.store.tx() as tx:
            rows = await tx.violators(rule, float(limit), BATCH)
            if not rows:
                return 0, 0
            moved = await tx.transition(
                [str(r["run_id"]) for r in rows],
                to,
                reason,
                from_=[from_],
                failure_kind=failure_kind,
                source="monitor",
            )
            refs = await kill_store.claim(tx, [(m.run_id, m.attempt) for m in moved])
        metrics.MONITOR_ACTIONS.labels(metric).inc(len(moved))
        self.actions.terminate_soon(refs, why, grace=grace)
        return len(rows), len(moved)

    async def max_runtime(self) -> int:
        async with self.store.tx() as tx:
            rows = await tx.violators("over_max_runtime", float(self.mon.max_runtime_seconds), BATCH)
            if not rows:
                return 0
            moved = []
            for limit in sorted({r["limit_seconds"] for r in rows}):
                ids = [str(r["run_id"]) for r in rows if r["limit_seconds"] == limit]
                moved += await tx.transition(
                    ids,
                    RunStatus.FAILURE,
                    f"exceeded max runtime of {limit:g} s",
                    from_=[RunStatus.STARTED],
                    failure_kind="infrastructure",
                    source="monitor",
                )
            refs = await kill_store.claim(tx, [(m.run_id, m.attempt) for m in moved])
        metrics.MONITOR_ACTIONS.labels("max_runtime").inc(len(moved))
        self.actions.terminate_soon(refs, "exceeded max runtime")
        return len(moved)

    async def heartbeat_timeout(self) -> int:
        """STARTED with no heartbeat of its current attempt for the timeout: hung or dead.
        The deadline alone makes it a crash; the backend is not asked (that would be a remote call
        under the row locks): the termination's outcome says whether the worker was hung or gone."""
        limit = self.mon.heartbeat_timeout_seconds
        async with self.store.tx() as tx:
            rows = await tx.violators("silent_workers", float(limit), BATCH, self.start_grace)
            if not rows:
                return 0
            crashed = []
            for row in rows:
                never = " (it never sent one)" if row["never_heartbeated"] else ""
                why = f"no heartbeat for {row['silent_seconds']:.0f} s{never}: worker hung or dead"
                crashed.append((str(row["run_id"]), row["attempt"], why))
                metrics.DETECTION_LATENCY.labels("heartbeat").observe(max(0.0, row["silent_seconds"] - limit))
            resumes = {
                str(r["run_id"]): r["resumes"]
                for r in await tx.conn.fetch(
                    "SELECT run_id, resumes FROM runs WHERE run_id = ANY($1::uuid[])", [r["run_id"] for r in rows]
                )
            }
            await crash(tx, crashed, resumes, self.mon.max_resume_run_attempts)
            # The superseded (or failed) attempts' workers are stopped at once; reap is the safety net.
            refs = await kill_store.claim(tx, [(run_id, attempt) for run_id, attempt, _ in crashed])
        self.actions.terminate_soon(refs, "no heartbeat (hung or dead)")
        return len(crashed)

    def _say_if_deaf(self, deadlines: Deadlines) -> None:
        """silent_workers measures silence only up to where the workers are heard (heartbeats written,
        events applied); say when that holds the rule (a stalled heartbeat service, broker or event
        consumer), and when it lets go."""
        lag = deadlines.heard_lag
        deaf = is_deaf(deadlines, self.mon.heartbeat_timeout_seconds)
        if deaf != self._deaf:
            self._deaf = deaf
            if deaf:
                behind = "nothing heard yet" if lag is None else f"heard {lag:.1f} s behind"
                # At start nothing is heard until the first canaries come round: not worth a warning.
                say = log.info if lag is None else log.warning
                say(
                    "heartbeat pipeline stale (%s; heartbeats or events): no run is taken for hung until it is heard",
                    behind,
                )
            else:
                log.info("heartbeat pipeline heard again (%.1f s behind): hung workers are detected", lag)

    @property
    def start_grace(self) -> float:
        """An attempt that has not heartbeated yet is still booting: it gets the start timeout."""
        return max(float(self.mon.heartbeat_timeout_seconds), float(self.mon.start_timeout_seconds))

    async def seconds_to_next_deadline(self) -> float:
        """How long the sweep loop may sleep: until the earliest timeout of any run (plus a little,
        so the row is past it). Timeouts fire on time, not a poll late. A run that appears while we
        sleep cannot fall due sooner than the shortest timeout, so that caps the sleep too (a
        `runherd/max_runtime` tag shorter than it may fire up to that much late). The last sweep's
        deadlines serve when it acted on nothing; otherwise they are read again."""
        mon = self.mon
        if not mon.enabled:
            return float(mon.poll_interval_seconds)  # only the reap rule and retries run
        deadlines = None if self._acted else self._last
        if deadlines is None:
            deadlines = await self._read_deadlines()
        timeouts = [
            mon.poll_interval_seconds,
            mon.heartbeat_timeout_seconds,
            mon.start_timeout_seconds,
            mon.cancel_timeout_seconds,
        ] + ([mon.max_runtime_seconds] if mon.max_runtime_seconds > 0 else [])
        elapsed = time.monotonic() - self._read_at
        return sleep_seconds(deadlines, elapsed, mon.heartbeat_timeout_seconds, float(min(timeouts)))

    async def retries(self) -> int:
        """Failed runs with retries left become new runs (services/monitor/retries.py)."""
        if not self.config.run_retries.enabled:
            return 0
        return await retry_failed_runs(self.store, self.config.run_retries, BATCH)

    async def reap(self) -> int:
        """Workers that must not run any more (superseded attempts, finished runs) are stopped."""
        lease = max(2 * self.mon.poll_interval_seconds, 5.0)
        refs = await self.store.claim_reaps(self.mon.heartbeat_timeout_seconds, lease, BATCH)
        self.actions.terminate_soon(refs, "its attempt is superseded or its run finished")
        return len(refs)
