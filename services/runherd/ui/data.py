"""What each page needs, read from PostgreSQL (through the UI's read-only pool) and RabbitMQ.
Decisions about the rows are model.py's; the SQL is the store's (store/ui.py, and the CLI's own
helpers in views.py for a run and the queue)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from runherd import sharding, views
from runherd.broker import COMMANDS_QUEUE, DEAD_QUEUE, ERROR_HEADER, EVENTS_QUEUE, HEARTBEATS_QUEUE, Broker
from runherd.config import Config
from runherd.contract import RunStatus
from runherd.store import Store
from runherd.store import retries as retry_store
from runherd.store import ui as reads
from runherd.ui import model

EVENTS_SHOWN = 1000
QUEUE_SHOWN = 200
DEAD_LETTER_CACHE_SECONDS = 5.0
LIVE_LOG_BYTES = 16_384


@dataclass
class Sources:
    cfg: Config
    store: Store
    broker: Broker
    _dead: tuple[float, list[dict[str, Any]]] | None = None
    _dead_lock: asyncio.Lock | None = None


def now() -> datetime:
    return datetime.now(UTC)


async def runs_page(src: Sources, query: model.ListQuery) -> dict[str, Any]:
    f = query.filter
    rows, (counts, at_least) = await asyncio.gather(
        reads.runs_page(src.store, f, query.limit + 1, older_than=query.older_than, newer_than=query.newer_than),
        reads.status_counts(src.store, f),
    )
    # One row more than shown says whether there is a page beyond (older, or newer when paging back).
    more = len(rows) > query.limit
    if query.newer_than is not None:
        rows = rows[-query.limit :] if more else rows
        has_newer, has_older = more, True
    else:
        rows = rows[: query.limit]
        has_newer, has_older = query.older_than is not None, more
    return {
        "rows": rows,
        "counts": counts,
        "total": sum(counts.values()),
        "at_least": {str(s) for s in at_least},
        "statuses": [s.value for s in RunStatus],
        "newer": query.params(before=model.encode_cursor(rows[0]), after=None) if rows and has_newer else None,
        "older": query.params(after=model.encode_cursor(rows[-1]), before=None) if rows and has_older else None,
        "first": query.params(after=None, before=None) if has_newer else None,
    }


async def run_page(src: Sources, run_id: str) -> dict[str, Any] | None:
    run = await src.store.get_run(run_id)
    if run is None:
        return None
    root = str(run["root_run_id"] or run["run_id"])
    lineage, attempts, events = await asyncio.gather(
        retry_store.lineage(src.store, root),
        reads.attempts(src.store, run_id),
        src.store.list_events(run_id),
    )
    view = views.show_view(run, lineage)
    at = now()
    attempt_views = model.attempt_views(run, attempts, events)
    for a in attempt_views:
        if a.kind == "running" and not a.log_tail:
            a.log_tail = _live_log_tail(a.handle)
    events = sorted(events, key=lambda e: (e["ts"], e["id"]))
    return {
        "run": run,
        "view": view,
        "attempts": attempt_views,
        "timeline": model.timeline(attempt_views, events, view["reused_steps"], at),
        "events": events[-EVENTS_SHOWN:],
        "events_cut": max(0, len(events) - EVENTS_SHOWN),
        "duration": model.duration(run["started_at"] or run["created_at"], run["ended_at"], at),
        "terminal": RunStatus(run["status"]).terminal,
        "outputs": {s["key"]: _pretty(s["output"]) for s in view["steps"] if s["output"] is not None},
    }


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _live_log_tail(handle: dict[str, Any] | None) -> list[str]:
    """The end of a running process-launcher worker's log, when this host can read it."""
    path = (handle or {}).get("log_path")
    if not path:
        return []
    try:
        with open(Path(path), "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - LIVE_LOG_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return model._log_tail(text)


async def queue_page(src: Sources) -> dict[str, Any]:
    rows = await reads.queued(src.store, QUEUE_SHOWN)
    waiting = await views.waiting_reasons(src.store, rows, src.cfg)
    counts = await src.store.count_active()
    return {"rows": rows, "waiting": waiting, "queued": counts.get("QUEUED", 0), "counts": counts}


async def fleet_page(src: Sources) -> dict[str, Any]:
    fleet = await reads.fleet(src.store)
    queues = {}
    for name in (COMMANDS_QUEUE, EVENTS_QUEUE, HEARTBEATS_QUEUE, DEAD_QUEUE):
        try:
            queues[name] = await src.broker.queue_stats(name)
        except Exception:
            queues[name] = None
    shards = src.cfg.event_shards
    live = [m["replica"] for m in fleet["monitors"] if m["alive"]]
    for m in fleet["monitors"]:
        m["shards"] = sorted(sharding.assigned(m["replica"], live, shards)) if m["alive"] and shards > 1 else []
    return {
        **fleet,
        "event_shards": shards,
        "queues": queues,
        "dead_letters": await dead_letters(src),
        "config": src.cfg,
    }


async def dead_letters(src: Sources) -> list[dict[str, Any]]:
    """The first dead letters with their reasons, peeked (never removed), cached a few seconds so
    reloading the page does not redeliver them again and again."""
    if src.cfg.ui.dead_letters_shown <= 0:
        return []
    if src._dead_lock is None:
        src._dead_lock = asyncio.Lock()
    async with src._dead_lock:
        if src._dead is not None and time.monotonic() - src._dead[0] < DEAD_LETTER_CACHE_SECONDS:
            return src._dead[1]
        try:
            peeked = await src.broker.peek(DEAD_QUEUE, src.cfg.ui.dead_letters_shown)
        except Exception:
            peeked = []
        found = [
            {
                "reason": str(p.headers.get(ERROR_HEADER) or "(no reason header)"),
                "exchange": p.headers.get("x-runherd-exchange") or "",
                "routing_key": p.headers.get("x-runherd-routing-key") or p.routing_key,
                "message_id": p.message_id,
                "timestamp": p.timestamp,
                "body": p.body[:600].decode(errors="replace"),
            }
            for p in peeked
        ]
        src._dead = (time.monotonic(), found)
        return found
