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


async def record_outcomes(
    store: Store,
    confirmed: Sequence[tuple[RunRef, str, dict[str, Any], bool]],
    failed: Sequence[tuple[RunRef, str, dict[str, Any]]],
    *,
    source: str,
    reason: str,
) -> None:
    """Many outcomes in one short transaction (a batch of terminations): ``confirmed`` as
    (ref, message, data, exited) become WORKER_TERMINATED (and the exit, when the worker is gone),
    ``failed`` as (ref, message, data) WORKER_TERMINATE_FAILED once per attempt."""
    if not confirmed and not failed:
        return
    async with store.tx() as tx:
        if confirmed:
            await tx.log(
                [(c[0].run_id, c[0].attempt, c[1]) for c in confirmed],
                type_="WORKER_TERMINATED",
                source=source,
                data=[c[2] for c in confirmed],
            )
            gone = [c for c in confirmed if c[3]]
            if gone:
                await tx.conn.execute(
                    q("record_exits"),
                    [UUID(c[0].run_id) for c in gone],
                    [c[0].attempt for c in gone],
                    [c[2].get("exit_code") for c in gone],
                    [reason for _ in gone],
                )
        if failed:
            await tx.conn.execute(
                q("log_kill_failures"),
                [UUID(f[0].run_id) for f in failed],
                [f[0].attempt for f in failed],
                source,
                [f[1] for f in failed],
                [f[2] for f in failed],
            )


async def record_failure(store: Store, ref: RunRef, message: str, *, source: str, data: dict[str, Any]) -> None:
    """A stop that could not be confirmed: WORKER_TERMINATE_FAILED, once per attempt."""
    await store.pool.execute(q("log_kill_failure"), UUID(ref.run_id), ref.attempt, source, message, data)
