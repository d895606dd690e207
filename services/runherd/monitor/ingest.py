"""Event ingestion: appends lifecycle events to the log idempotently and applies transitions.

A batch of deliveries is applied in one transaction: its runs are locked with one statement and
kept in a small cache (re-read after an event changed a run's status or attempt), so a step event
costs two statements. Acks go out after the commit, side effects (fencing a zombie worker) after
that. If a statement fails, the batch is applied again event by event in savepoints, so one
poison event cannot hold back the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from runherd import metrics
from runherd.config import Config
from runherd.contract import Event, EventType, RunStatus, StepStatus
from runherd.errors import InvalidMessage
from runherd.rules.events import Action, on_worker_event, on_worker_exit
from runherd.store import RunRef, Tx

log = logging.getLogger("runherd.monitor.ingest")

_STEP_STATUS = {
    EventType.STEP_SUCCESS: StepStatus.SUCCESS,
    EventType.STEP_FAILURE: StepStatus.FAILURE,
    EventType.STEP_SKIPPED: StepStatus.SKIPPED,
    EventType.STEP_UP_FOR_RETRY: StepStatus.UP_FOR_RETRY,
}


@dataclass
class Effects:
    fence: list[tuple[str, int]] = field(default_factory=list)  # (run_id, attempt) to terminate
    over_max_runtime: list[tuple[str, int]] = field(default_factory=list)  # to terminate: its step Jobs too
    failed: bool = False  # a run failed: the retry rule should not wait for the next sweep
    exits: list[tuple[str, datetime]] = field(default_factory=list)


class LockedRuns:
    """The batch's runs, locked once. An action that changes a run's status or attempt marks it
    stale; it is read again (already locked) before the next event of that run.

    With ``gather_steps``, step events (which change no run) are gathered and written with one
    statement, flushed before any other event so the event log keeps the batch's order. The exits of
    crashed workers are gathered too, flushed before any event that is not such an exit or is of one
    of their runs: each run's events keep their order."""

    def __init__(self, tx: Tx, *, gather_steps: bool = False) -> None:
        self.tx = tx
        self.rows: dict[str, Any] = {}
        self.stale: set[str] = set()
        self.gather_steps = gather_steps
        self.pending: list[tuple[Any, ...]] = []
        # The exits of crashed workers gathered the same way: a crash storm's WORKER_EXITED events,
        # exits and resumes are three statements, not three per exit. (event, the run's resumes).
        self.exits: list[tuple[Event, int]] = []
        self.exit_runs: set[str] = set()
        self.max_resumes = 0
        self.effects: Effects | None = None

    async def flush_steps(self) -> None:
        if self.pending:
            for kind, n in (await self.tx.step_events(self.pending)).items():
                metrics.EVENTS_APPLIED.labels(kind).inc(n)
            self.pending.clear()

    async def flush(self) -> None:
        await self.flush_steps()
        if not self.exits:
            return
        pending, self.exits, self.exit_runs = self.exits, [], set()
        rows = [
            (
                e.run_id,
                e.attempt,
                e.source,
                e.seq,
                e.message,
                e.data,
                datetime.fromisoformat(e.ts),
                e.data.get("exit_code"),
                e.data.get("reason"),
            )
            for e, _ in pending
        ]
        appended = await self.tx.worker_exits(rows)
        crashed: list[tuple[str, int, str]] = []
        resumes_of: dict[str, int] = {}
        assert self.effects is not None
        for event, resumes in pending:
            if (event.run_id, event.attempt) not in appended:
                log.debug("duplicate event ignored run_id=%s attempt=%s seq=%s", event.run_id, event.attempt, event.seq)
                continue
            metrics.EVENTS_APPLIED.labels(event.type.value).inc()
            self.effects.exits.append((event.run_id, datetime.fromisoformat(event.ts)))
            crashed.append((event.run_id, event.attempt, f"worker crashed: {event.message}"))
            resumes_of[event.run_id] = resumes
            self.stale.add(event.run_id)
        if crashed:
            self.effects.failed = True  # as in _act: if the crash budget is spent
            await crash(self.tx, crashed, resumes_of=resumes_of, max_resumes=self.max_resumes)

    def exit_later(self, event: Event, resumes: int, max_resumes: int, effects: Effects) -> None:
        self.exits.append((event, resumes))
        self.exit_runs.add(event.run_id)
        self.max_resumes = max_resumes
        self.effects = effects

    async def lock(self, run_ids: list[str]) -> None:
        self.rows = await self.tx.lock_runs(run_ids)

    async def get(self, run_id: str) -> Any:
        if run_id in self.stale:
            self.rows.update(await self.tx.lock_runs([run_id]))
            self.stale.discard(run_id)
        return self.rows.get(run_id)


_STEP_ACTIONS = frozenset({Action.STEP_START, Action.STEP_END})
_CHANGES_RUN = frozenset(Action) - _STEP_ACTIONS


async def apply_event(tx: Tx, event: Event, config: Config, effects: Effects, runs: LockedRuns) -> None:
    if runs.exits and (event.type is not EventType.WORKER_EXITED or event.run_id in runs.exit_runs):
        await runs.flush()  # gathered crashes go first: this event may depend on them
    run = await runs.get(event.run_id)
    if run is None:
        raise InvalidMessage(f"event for unknown run {event.run_id}")
    status, attempt = RunStatus(run["status"]), run["attempt"]
    if event.type is EventType.WORKER_EXITED:
        decision = on_worker_exit(status, attempt, event.attempt, event.data.get("reason"))
        if runs.gather_steps and decision.actions == (Action.CRASHED,) and not decision.refused:
            await runs.flush_steps()
            runs.exit_later(event, run["resumes"], config.run_monitoring.max_resume_run_attempts, effects)
            return
    else:
        decision = on_worker_event(status, attempt, event)
    if _STEP_ACTIONS.intersection(decision.actions):
        # A step's progress: the event and the step change in one statement, gathered with the
        # batch's other step events when nothing in between changes a run.
        row = (
            event.run_id,
            event.attempt,
            event.source,
            event.seq,
            event.type.value,
            event.step_key or "",
            event.message,
            event.data,
            datetime.fromisoformat(event.ts),
            _STEP_STATUS.get(event.type, StepStatus.RUNNING).value,
            event.data.get("output") if event.type is EventType.STEP_SUCCESS else None,
        )
        if runs.gather_steps and len(decision.actions) == 1:
            runs.pending.append(row)
            return
        await runs.flush()
        inserted = bool(await tx.step_events([row]))
    else:
        await runs.flush_steps()  # gathered exits stay gathered: this event is not of their runs
        inserted = await tx.insert_event(
            run_id=event.run_id,
            attempt=event.attempt,
            source=event.source,
            seq=event.seq,
            type_=event.type.value,
            step_key=event.step_key,
            message=event.message,
            data=event.data,
            refused=decision.refused,
            ts=datetime.fromisoformat(event.ts),
        )
    if not inserted:
        log.debug("duplicate event ignored run_id=%s attempt=%s seq=%s", event.run_id, event.attempt, event.seq)
        return
    if event.type is EventType.WORKER_EXITED:
        await tx.record_exit(event.run_id, event.attempt, event.data.get("exit_code"), event.data.get("reason"))
        effects.exits.append((event.run_id, datetime.fromisoformat(event.ts)))
    if decision.refused:
        metrics.EVENTS_REFUSED.inc()
        log.warning(
            "refused %s run_id=%s attempt=%s: %s", event.type.value, event.run_id, event.attempt, decision.refused
        )
        effects.fence.append((event.run_id, event.attempt))
        return
    metrics.EVENTS_APPLIED.labels(event.type.value).inc()
    for action in decision.actions:
        if action not in _STEP_ACTIONS:
            await _act(tx, action, event, run, config, effects)
    if _CHANGES_RUN.intersection(decision.actions):
        runs.stale.add(event.run_id)


async def _act(tx: Tx, action: Action, event: Event, run: Any, config: Config, effects: Effects) -> None:
    run_id, attempt = event.run_id, event.attempt
    if action is Action.MARK_STARTED:
        await tx.transition([run_id], RunStatus.STARTED, None, attempt=attempt, source="worker")
    elif action is Action.SUCCEED:
        await tx.transition([run_id], RunStatus.SUCCESS, None, attempt=attempt, source="worker")
    elif action is Action.FAIL:
        effects.failed = True
        await tx.transition(
            [run_id], RunStatus.FAILURE, event.message, attempt=attempt, failure_kind="step", source="worker"
        )
    elif action is Action.CANCELED:
        reason = "canceled" if event.type is EventType.RUN_CANCELED else f"canceled; worker {event.message}"
        await tx.transition([run_id], RunStatus.CANCELED, reason, attempt=attempt, source="worker")
    elif action is Action.FAIL_BEFORE_START:
        effects.failed = True
        await tx.transition(
            [run_id],
            RunStatus.FAILURE,
            f"worker exited before it started: {event.message}",
            attempt=attempt,
            failure_kind="infrastructure",
            source="monitor",
        )
    elif action is Action.MAX_RUNTIME:
        # The limit and words of the sweep's max runtime rule (over_max_runtime); with no limit (a
        # launcher reporting the reason for a deadline of its own), a crash as any other.
        limit = run["max_runtime_seconds"]
        if limit is None:
            limit = config.run_monitoring.max_runtime_seconds
        if limit <= 0:
            await _act(tx, Action.CRASHED, event, run, config, effects)
            return
        effects.failed = True
        moved = await tx.transition(
            [run_id],
            RunStatus.FAILURE,
            f"exceeded max runtime of {limit:g} s",
            attempt=attempt,
            from_=[RunStatus.STARTED],
            failure_kind="infrastructure",
            source="monitor",
        )
        if moved:
            metrics.MONITOR_ACTIONS.labels("max_runtime").inc()
            # The worker is gone, but a launcher-executor step's container or Job may not be: the
            # launcher's terminate stops them, as after the sweep's max runtime.
            effects.over_max_runtime.append((run_id, attempt))
    elif action is Action.CRASHED:
        effects.failed = True  # if the crash budget is spent; a needless wake otherwise costs one sweep
        await crash(
            tx,
            [(run_id, attempt, f"worker crashed: {event.message}")],
            resumes_of={run_id: run["resumes"]},
            max_resumes=config.run_monitoring.max_resume_run_attempts,
        )


async def crash(
    tx: Tx, crashed: list[tuple[str, int, str]], resumes_of: dict[str, int], max_resumes: int
) -> list[RunRef]:
    """Resume each crashed attempt while resumes are left (one CAS), fail the others."""
    resumed = await tx.resume(crashed, max_resumes)
    done = {r.run_id for r in resumed}
    for run_id, attempt, why in crashed:
        if run_id in done:
            metrics.MONITOR_ACTIONS.labels("resume").inc()
            log.info("resuming run_id=%s attempt=%s: %s", run_id, attempt + 1, why)
            continue
        crashes = resumes_of.get(run_id, max_resumes) + 1
        reason = (
            f"worker crashed {crashes} times ({why}); no resumes left of max_resume_run_attempts={max_resumes}"
            if max_resumes > 0
            else f"{why}; resume is off (max_resume_run_attempts=0)"
        )
        moved = await tx.transition(
            [run_id],
            RunStatus.FAILURE,
            reason,
            attempt=attempt,
            from_=[RunStatus.STARTED],
            failure_kind="infrastructure",
            source="monitor",
        )
        if moved:
            metrics.MONITOR_ACTIONS.labels("fail_crashed").inc()
    return resumed
