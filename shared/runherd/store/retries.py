"""Run retries and lineage in PostgreSQL (the SQL is in queries_retries.sql).

A monitor claims failed runs with no retry decision (``claim_failed``, SKIP LOCKED), decides each
with the pure rule of shared/rules/retries.py, and records every decision with ``record`` in the same
transaction: the origin is marked ``retried`` and its retry run inserted by one statement, so however
many monitors run, a failed run is retried at most once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from runherd.store.queries import q
from runherd.store.store import LAUNCH_CHANNEL, OUTBOX_CHANNEL, Store, Tx


@dataclass(frozen=True)
class FailedRun:
    run_id: str
    job: str
    attempt: int
    tags: dict[str, Any]
    failure_kind: str | None
    retry_number: int
    root_run_id: str
    ended_at: datetime | None


@dataclass(frozen=True)
class Retry:
    """One decision to record: ``retry_run_id`` None means the origin is not retried."""

    origin: FailedRun
    message: str
    retry_run_id: str | None = None
    retry_number: int = 0
    strategy: str = "FROM_FAILURE"
    delay_seconds: float = 0.0
    tags: dict[str, Any] | None = None
    log: bool = True  # write the decision into the origin's event log

    @classmethod
    def new_id(cls) -> str:
        return str(uuid.uuid4())


async def claim_failed(tx: Tx, limit: int) -> list[FailedRun]:
    """Failed runs awaiting a retry decision, locked for this transaction (others skip them)."""
    rows = await tx.conn.fetch(q("claim_failed_runs"), limit)
    return [
        FailedRun(
            run_id=str(r["run_id"]),
            job=r["job"],
            attempt=r["attempt"],
            tags=r["tags"],
            failure_kind=r["failure_kind"],
            retry_number=r["retry_number"],
            root_run_id=str(r["root_run_id"] or r["run_id"]),
            ended_at=r["ended_at"],
        )
        for r in rows
    ]


async def record(tx: Tx, decisions: Sequence[Retry]) -> dict[str, str | None]:
    """Mark each origin decided and insert its retry run, in one statement; returns origin ->
    retry run id (None: not retried). Origins already decided by someone else are left out."""
    if not decisions:
        return {}
    rows = await tx.conn.fetch(
        q("record_retries"),
        [UUID(d.origin.run_id) for d in decisions],
        [d.message for d in decisions],
        [UUID(d.retry_run_id) if d.retry_run_id else None for d in decisions],
        [d.retry_number for d in decisions],
        [d.strategy for d in decisions],
        [float(d.delay_seconds) for d in decisions],
        [d.tags or {} for d in decisions],
        [d.log for d in decisions],
    )
    out = {str(r["origin"]): (str(r["retry_run_id"]) if r["retry_run_id"] else None) for r in rows}
    if any(out.values()):
        await tx.conn.execute("SELECT pg_notify($1, ''), pg_notify($2, '')", LAUNCH_CHANNEL, OUTBOX_CHANNEL)
    return out


async def lineage(store: Store, root_run_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """The runs sharing a root: the original, its retries and re-executions, oldest first."""
    return [dict(r) for r in await store.pool.fetch(q("lineage"), UUID(root_run_id), limit)]


async def queued_details(store: Store, run_ids: Sequence[str | UUID]) -> dict[str, dict[str, Any]]:
    """Priority, retry backoff (``not_before``) and age of queued runs, by run id."""
    ids = [r if isinstance(r, UUID) else UUID(str(r)) for r in run_ids]
    return {str(r["run_id"]): dict(r) for r in await store.pool.fetch(q("queued_details"), ids)}
