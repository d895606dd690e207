"""Which queued runs the dequeue takes, and why each other one waits (for `runherd runs --status
QUEUED`).

The dequeue itself is one SQL statement (queries.sql: dequeue, a walk down the queue); this is the
same decision in Python, walking the queued runs in dequeue order (priority, then FIFO): a run that
fits takes its slots, so the runs behind it see them taken, and a run held by a limit holds back no
one. ``pick`` is what the statement must return (tests/integration/test_queue.py compares them on
random queues); ``why_waiting`` explains the rest. Pure: no I/O.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson

from runherd import contract
from runherd.config import RunCoordinator, TagConcurrencyLimit
from runherd.errors import InvalidMessage

NEXT = "next in line: fits every limit"


def tag_text(value: Any) -> str:
    """A tag value as PostgreSQL's ``tags->>key`` spells it, so both sides group runs alike."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def group(limit: TagConcurrencyLimit, tags: dict[str, Any]) -> str | None:
    """The group of ``limit`` that a run with these tags counts against, or None."""
    if limit.key not in tags:
        return None
    value = tag_text(tags[limit.key])
    if limit.value is not None and value != limit.value:
        return None
    return value if limit.per_unique_value else ""


def _order(run: dict[str, Any]) -> tuple[int, datetime, str]:
    priority = run.get("priority")
    if priority is None:
        try:
            priority = contract.priority(run.get("tags") or {})
        except InvalidMessage:
            priority = 0
    created = run.get("created_at") or datetime.min.replace(tzinfo=UTC)
    return (-priority, created, str(run["run_id"]))


def why_waiting(
    queued: list[dict[str, Any]],
    in_flight: list[dict[str, Any]],
    coordinator: RunCoordinator,
    now: datetime | None = None,
) -> dict[str, str]:
    """run_id -> why it waits. ``queued`` rows have run_id and tags, and may have priority
    (else read from the tags), created_at and not_before (a retry's backoff); ``in_flight`` rows
    have tags."""
    now = now or datetime.now(UTC)
    limits = coordinator.tag_concurrency_limits
    counts: Counter[tuple[int, str]] = Counter()
    for run in in_flight:
        for i, limit in enumerate(limits):
            g = group(limit, run["tags"])
            if g is not None:
                counts[(i, g)] += 1
    busy = len(in_flight)
    cap = coordinator.max_concurrent_runs
    held: dict[str, str] = {}
    for run in sorted(queued, key=_order):
        tags = run.get("tags") or {}
        not_before = run.get("not_before")
        if not_before is not None and not_before > now:
            held[str(run["run_id"])] = (
                f"retry backoff: not before {not_before.astimezone(UTC):%H:%M:%S} UTC "
                f"({(not_before - now).total_seconds():.0f} s)"
            )
            continue
        reasons = []
        groups = [(i, limit, group(limit, tags)) for i, limit in enumerate(limits)]
        for i, limit, g in groups:
            if g is not None and counts[(i, g)] >= limit.limit:
                shown = f"{limit.key}={tags[limit.key]}" if g or limit.value is not None else limit.key
                reasons.append(f"tag limit {shown}: {counts[(i, g)]}/{limit.limit} in flight")
        if 0 <= cap <= busy:
            reasons.append(f"max_concurrent_runs: {busy}/{cap} in flight")
        if reasons:
            held[str(run["run_id"])] = "; ".join(reasons)
            continue
        held[str(run["run_id"])] = NEXT
        busy += 1  # it takes its slots: the runs behind it see them taken
        for i, _, g in groups:
            if g is not None:
                counts[(i, g)] += 1
    return held


def pick(
    queued: list[dict[str, Any]],
    in_flight: list[dict[str, Any]],
    coordinator: RunCoordinator,
    n: int,
    now: datetime | None = None,
) -> list[str]:
    """The run ids the dequeue takes, in order: at most ``n`` of the runs that fit (``why_waiting``
    says NEXT), as queries.sql ``dequeue`` walks them."""
    held = why_waiting(queued, in_flight, coordinator, now)  # in dequeue order
    return [run_id for run_id, why in held.items() if why == NEXT][: max(n, 0)]
