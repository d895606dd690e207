"""Which monitor replica consumes which event shard (``event_shards`` > 1): pure, shared by the
monitor (runherd.monitor.shards, which acts on it) and the web view (which shows it).

Rendezvous hashing: every shard goes to the live replica with the highest weight for it, so every
replica computes the same assignment from the same list, and a join or leave moves only the shards
it must. A replica is live while its lease row (``monitor_replicas``) is younger than
``LEASE_SECONDS``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

LEASE_SECONDS = 3.0


def _weight(replica: str, shard: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{replica}/{shard}".encode()).digest()[:8], "big")


def owner(shard: int, replicas: Iterable[str]) -> str:
    """The replica a shard belongs to: the highest weight (rendezvous hashing), ties by name."""
    return max(replicas, key=lambda r: (_weight(r, shard), r))


def assigned(replica: str, replicas: Iterable[str], shards: int) -> frozenset[int]:
    """The shards ``replica`` consumes among the live ``replicas`` (itself counted if absent)."""
    live = sorted(set(replicas) | {replica})
    return frozenset(s for s in range(shards) if owner(s, live) == replica)
