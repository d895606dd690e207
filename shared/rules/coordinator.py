"""Why a queued run waits: the limit it is held by (for `runherd runs --status QUEUED`).

The dequeue itself is one SQL statement (queries.sql: dequeue); this explains its outcome.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from shared.config import RunCoordinator, TagConcurrencyLimit


def _group(limit: TagConcurrencyLimit, tags: dict[str, Any]) -> str | None:
    if limit.key not in tags:
        return None
    value = str(tags[limit.key])
    if limit.value is not None and value != limit.value:
        return None
    return value if limit.per_unique_value else ""


def why_waiting(queued: list[dict[str, Any]], in_flight: list[dict[str, Any]],
                coordinator: RunCoordinator) -> dict[str, str]:
    held: dict[str, str] = {}
    counts: Counter[tuple[int, str]] = Counter()
    for run in in_flight:
        for i, limit in enumerate(coordinator.tag_concurrency_limits):
            group = _group(limit, run["tags"])
            if group is not None:
                counts[(i, group)] += 1
    full = 0 <= coordinator.max_concurrent_runs <= len(in_flight)
    for run in queued:
        reasons = []
        for i, limit in enumerate(coordinator.tag_concurrency_limits):
            group = _group(limit, run["tags"])
            if group is not None and counts[(i, group)] >= limit.limit:
                shown = f"{limit.key}={run['tags'][limit.key]}" if group or limit.value else limit.key
                reasons.append(f"tag limit {shown}: {counts[(i, group)]}/{limit.limit} in flight")
        if full:
            reasons.append(f"max_concurrent_runs {coordinator.max_concurrent_runs} reached")
        held[str(run["run_id"])] = "; ".join(reasons) or "next in line"
    return held
