"""Reads of `runherd ui` (the SQL is in queries_ui.sql). Read only: nothing here writes.

The run list's filters are fixed SQL clauses (FILTERS), AND-ed into the named query in place of
``/*filters*/``; values are always parameters. Each combination of filters is then its own prepared
statement, planned for exactly those filters, so a page is an index range scan on runs_keyset,
runs_status_keyset, runs_job or runs_tags (migration 0007) rather than a generic plan that must
cope with every filter being absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from runherd import sharding
from runherd.contract import RunStatus
from runherd.store.queries import q
from runherd.store.store import Store

# Advisory locks of store.py, by what holds them.
LOCKS = {0x5248424F: "outbox relay", 0x52484451: "dequeue"}


@dataclass(frozen=True)
class RunFilter:
    """What the run list shows. ``tags`` are (key, value) pairs; value None: the key is present.
    A tag value matches as text or as the JSON it spells (``priority=5`` matches 5 and "5")."""

    status: str | None = None
    job: str | None = None
    tags: Sequence[tuple[str, str | None]] = ()
    created_from: datetime | None = None
    created_to: datetime | None = None


@dataclass(frozen=True)
class Cursor:
    """A keyset position: the (created_at, run_id) of a row at a page's edge."""

    created_at: datetime
    run_id: UUID


@dataclass
class _Sql:
    offset: int = 1  # parameters before the filters' ($1: the page size)
    clauses: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def add(self, clause: str, *values: Any) -> None:
        names = []
        for value in values:
            self.args.append(value)
            names.append(f"${len(self.args) + self.offset}")  # after the query's own parameters
        self.clauses.append(clause.format(*names))


def _tag_variants(key: str, value: str) -> list[dict[str, Any]]:
    import orjson

    variants: list[dict[str, Any]] = [{key: value}]
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return variants
    if parsed != value and not isinstance(parsed, dict | list):
        variants.append({key: parsed})
    return variants


def _where(f: RunFilter, *, with_status: bool = True, offset: int = 1) -> _Sql:
    sql = _Sql(offset)
    if with_status and f.status:
        # Written out, not a parameter (it is one of seven known words): a plan for `status = 'FAILURE'`
        # may use the partial indexes (runs_status_keyset, runs_in_flight, runs_queued), one for
        # `status = $2` may not.
        sql.clauses.append(f"status = '{RunStatus(f.status).value}'")
    if f.job:
        sql.add("job = {0}::text", f.job)
    for key, value in f.tags:
        if value is None:
            sql.add("tags ? {0}::text", key)
        else:
            variants = _tag_variants(key, value)
            sql.add("(" + " OR ".join(f"tags @> {{{i}}}::jsonb" for i in range(len(variants))) + ")", *variants)
    if f.created_from:
        sql.add("created_at >= {0}::timestamptz", f.created_from)
    if f.created_to:
        sql.add("created_at < {0}::timestamptz", f.created_to)
    return sql


def _render(name: str, sql: _Sql) -> str:
    return q(name).replace("/*filters*/", "".join(f" AND {c}" for c in sql.clauses))


async def runs_page(
    store: Store, f: RunFilter, limit: int, *, older_than: Cursor | None = None, newer_than: Cursor | None = None
) -> list[dict[str, Any]]:
    """Up to ``limit`` runs, newest first: the first page, the page after ``older_than`` (the next
    link) or the page before ``newer_than`` (the previous link)."""
    sql = _where(f)
    if older_than is not None:
        sql.add("(created_at, run_id) < ({0}::timestamptz, {1}::uuid)", older_than.created_at, older_than.run_id)
    if newer_than is not None:
        sql.add("(created_at, run_id) > ({0}::timestamptz, {1}::uuid)", newer_than.created_at, newer_than.run_id)
        rows = await store.pool.fetch(_render("ui_runs_page_newer", sql), limit, *sql.args)
        return [dict(r) for r in reversed(rows)]
    return [dict(r) for r in await store.pool.fetch(_render("ui_runs_page", sql), limit, *sql.args)]


def page_sql(f: RunFilter, limit: int, older_than: Cursor | None = None) -> tuple[str, list[Any]]:
    """The statement and arguments runs_page runs, for EXPLAIN in tests and the benchmark's bare query."""
    sql = _where(f)
    if older_than is not None:
        sql.add("(created_at, run_id) < ({0}::timestamptz, {1}::uuid)", older_than.created_at, older_than.run_id)
    return _render("ui_runs_page", sql), [limit, *sql.args]


COUNT_CAP = 10_000


async def status_counts(store: Store, f: RunFilter, cap: int = COUNT_CAP) -> tuple[dict[str, int], set[str]]:
    """Runs per status under ``f``'s other filters, and the statuses whose count is only a lower bound.
    Without a job or tag filter each status is counted through its own index up to ``cap``; with one,
    the matching runs are counted in one pass through that filter's index, up to ``cap`` in all (past
    it every count is a lower bound). Either way a count reads at most ``cap`` rows per status."""
    sql = _where(f, with_status=False, offset=1)
    grouped = bool(f.job or f.tags)
    rows = await store.pool.fetch(
        _render("ui_status_counts_grouped" if grouped else "ui_status_counts", sql), cap, *sql.args
    )
    counts = {r["status"]: r["n"] for r in rows}
    if grouped:
        return counts, (set(RunStatus) if sum(counts.values()) >= cap else set())
    return counts, {s for s, n in counts.items() if n >= cap}


async def attempts(store: Store, run_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await store.pool.fetch(q("ui_attempts"), UUID(run_id))]


async def jobs(store: Store) -> list[str]:
    return [r["job"] for r in await store.pool.fetch(q("ui_jobs"))]


async def fleet(store: Store) -> dict[str, Any]:
    """Heartbeat and monitor replicas, watermarks and lags, and who holds runherd's advisory locks."""
    replicas = [dict(r) for r in await store.pool.fetch(q("ui_heartbeat_replicas"))]
    monitors = [dict(r) for r in await store.pool.fetch(q("ui_monitor_replicas"), sharding.LEASE_SECONDS)]
    marks = dict(await store.pool.fetchrow(q("ui_watermarks")) or {})
    leaders = [
        {**dict(r), "role": LOCKS.get(r["lock_id"], str(r["lock_id"]))}
        for r in await store.pool.fetch(q("ui_leaders"), list(LOCKS))
    ]
    return {"replicas": replicas, "monitors": monitors, "watermarks": marks, "leaders": leaders}


async def queued(store: Store, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` queued runs in dequeue order."""
    return [dict(r) for r in await store.pool.fetch(q("ui_queued"), limit)]
