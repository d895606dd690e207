"""Loads the named queries of queries.sql (``-- name: NAME`` blocks)."""

from __future__ import annotations

import re
from importlib import resources

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
# dequeue_move inlines the dequeue decision (kept as its own statement, tested on its own).
assert QUERIES["dequeue_move"].count("{dequeue}") == 1
QUERIES["dequeue_move"] = QUERIES["dequeue_move"].replace("{dequeue}", QUERIES["dequeue"].rstrip(";"))


def q(name: str) -> str:
    return QUERIES[name]
