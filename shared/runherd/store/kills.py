"""Worker kills in PostgreSQL (the SQL is in queries_kills.sql).

A sweep decides which workers to stop in its deciding transaction (``claim``), terminates them
after the commit, and records what really happened in a second short transaction (``record``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from runherd.store.queries import q
from runherd.store.store import RunRef, Store, Tx


async def claim(tx: Tx, attempts: Sequence[tuple[str, int]]) -> list[RunRef]:
    """Mark these (run_id, attempt) workers to be stopped now and claim them; returns those that
    have a live worker, with its handle."""
    if not attempts:
        return []
    rows = await tx.conn.fetch(q("claim_kills"), [UUID(a[0]) for a in attempts], [a[1] for a in attempts])
    return [RunRef(str(r["run_id"]), r["attempt"], r["handle"]) for r in rows]


async def record_terminated(
    store: Store, ref: RunRef, message: str, *, source: str, data: dict[str, Any], exited: bool, reason: str
) -> None:
    """A confirmed stop: WORKER_TERMINATED, and the attempt's exit when the worker is gone (the
    reap rule then never picks it again)."""
    async with store.tx() as tx:
        await tx.log([(ref.run_id, ref.attempt, message)], type_="WORKER_TERMINATED", source=source, data=[data])
        if exited:
            await tx.record_exit(ref.run_id, ref.attempt, data.get("exit_code"), reason)


async def record_failure(store: Store, ref: RunRef, message: str, *, source: str, data: dict[str, Any]) -> None:
    """A stop that could not be confirmed: WORKER_TERMINATE_FAILED, once per attempt."""
    await store.pool.execute(q("log_kill_failure"), UUID(ref.run_id), ref.attempt, source, message, data)
