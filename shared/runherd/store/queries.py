"""Loads the named queries of queries.sql (``-- name: NAME`` blocks)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> dict[str, str]:
    """queries.sql, then every queries_<topic>.sql beside it."""
    folder = resources.files("runherd.store")
    files = sorted(f.name for f in folder.iterdir() if f.name.startswith("queries") and f.name.endswith(".sql"))
    found: dict[str, str] = {}
    for name in files:
        parts = _NAME.split(folder.joinpath(name).read_text())
        for query, body in zip(parts[1::2], parts[2::2], strict=True):
            if query in found:
                raise ValueError(f"query {query!r} is defined twice ({name})")
            found[query] = body.strip()
    return found


QUERIES = _load()
# dequeue_move inlines the dequeue decision (kept as its own statement, tested on its own); both hold
# {held}, written out per limit by dequeue_query.
assert QUERIES["dequeue_move"].count("{dequeue}") == 1
QUERIES["dequeue_move"] = QUERIES["dequeue_move"].replace("{dequeue}", QUERIES["dequeue"].rstrip(";"))


def q(name: str) -> str:
    return QUERIES[name]


def _held(i: int, by_value: bool, per_unique: bool) -> str:
    """Limit ``i`` (1-based, as `lim.i`) holds queued run ``r`` at the walk's counts ``w.counts``.
    The key, value and cap are sub-selects of `lim` (computed once per statement); only whether the
    limit has a value and whether it counts per value shape the text."""
    key, value, cap = (f"(SELECT {col} FROM lim WHERE i = {i})" for col in ("key", "value", "cap"))
    text = f"coalesce(r.tags->>{key}, 'null')"  # as coordinator.tag_text spells a JSON null
    member = f"r.tags ? {key}" + (f" AND {text} = {value}" if by_value else "")
    grp = f"'{i}:' || {text}" if per_unique else f"'{i}:'"
    return f"({member} AND coalesce((w.counts->>({grp}))::integer, 0) >= {cap})"


@functools.cache
def _dequeue(shape: tuple[tuple[bool, bool], ...], move: bool) -> str:
    held = " OR ".join(_held(i, *s) for i, s in enumerate(shape, 1)) or "false"
    return QUERIES["dequeue_move" if move else "dequeue"].replace("{held}", held)


def dequeue_query(limits: Sequence[dict[str, Any]], move: bool = False) -> str:
    """queries.sql ``dequeue`` (``move``: ``dequeue_move``) for these limits, as Store.dequeue
    passes them ($2). The text depends only on each limit's shape (by value or not, per unique
    value or not), so a launcher prepares one statement per configuration."""
    return _dequeue(tuple((lim.get("value") is not None, bool(lim.get("per_unique_value"))) for lim in limits), move)
