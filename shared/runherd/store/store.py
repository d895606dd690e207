"""PostgreSQL state of runherd: the only module that imports asyncpg.

Services call domain methods (``insert_run``, ``dequeue``, ``record_heartbeats``...); the SQL is
in queries.sql. Driver errors are converted to RunherdError subclasses here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from runherd.auth import Keys
from runherd.config import redact
from runherd.contract import ALLOWED_FROM, Launch, RunStatus
from runherd.errors import NotMigrated, RunherdError
from runherd.rules.sweeps import Deadlines, StartedPass
from runherd.store.migrate import SCHEMA_VERSION, current_version
from runherd.store.queries import dequeue_query, q

log = logging.getLogger("runherd.store")

LAUNCH_CHANNEL = "runherd_launch"
STATEMENT_TIMEOUT_SECONDS = 30.0
OUTBOX_CHANNEL = "runherd_outbox"
_DEQUEUE_LOCK = 0x52484451  # "RHDQ": one dequeue at a time across launcher replicas
_OUTBOX_LOCK = 0x5248424F  # "RHBO": one outbox relay at a time, so status order per run holds

# Errors after which the same work, tried again later, can succeed: the database restarting, failing
# over or unreachable (AdminShutdown, CannotConnectNow, connection lost, read-only after a failover),
# out of connections, a statement that hit its timeout, and concurrency (deadlock, serialization).
# Callers hold their work and retry with backoff; none of these may end a service.
TransientDbError: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.LockNotAvailableError,
    # A pooled connection broken mid-operation by the server going away can surface as this
    # client-side state error on its next use; the pool replaces the connection.
    asyncpg.exceptions.InternalClientError,
)


class StoreError(RunherdError):
    pass


async def _init(conn: asyncpg.Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(
            typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


@dataclass(frozen=True)
class Transitioned:
    run_id: str
    job: str
    status: RunStatus
    previous_status: RunStatus
    attempt: int


@dataclass(frozen=True)
class LaunchClaim:
    run_id: str
    attempt: int
    job: str
    status: RunStatus
    current_attempt: int
    tags: dict[str, Any]
    steps: list[dict[str, Any]]
    env: dict[str, str]
    launcher: str | None
    max_runtime_seconds: float | None
    completed: dict[str, Any]
    step_tries: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> failed_tries, retry_at


@dataclass(frozen=True)
class RunRef:
    run_id: str
    attempt: int
    handle: dict[str, Any] | None = None


def _ids(run_ids: Sequence[str | UUID]) -> list[UUID]:
    return [r if isinstance(r, UUID) else UUID(str(r)) for r in run_ids]


def _queued_row(launch: Launch, max_runtime: float | None, priority: int) -> dict[str, Any]:
    """A run for ``insert_runs`` (one element of its JSON array)."""
    return {
        "run_id": launch.run_id,
        "job": launch.job,
        "priority": priority,
        "tags": launch.tags,
        "steps": [s.to_json() for s in launch.steps],
        "env": launch.env,
        "launcher": launch.launcher,
        "max_runtime_seconds": max_runtime,
    }


class Tx:
    """Domain operations on one connection, usually inside one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def transition(
        self,
        run_ids: Sequence[str | UUID],
        to: RunStatus,
        reason: str | None = None,
        *,
        from_: Sequence[RunStatus] | None = None,
        attempt: int | None = None,
        failure_kind: str | None = None,
        source: str = "runherd",
    ) -> list[Transitioned]:
        """Compare-and-set: only runs in an allowed from-status (and the given attempt) move."""
        allowed = [s.value for s in (from_ if from_ is not None else ALLOWED_FROM[to])]
        rows = await self.conn.fetch(
            q("transition"), _ids(run_ids), allowed, to.value, reason, failure_kind, attempt, source
        )
        if rows:
            await self.conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return [
            Transitioned(
                str(r["run_id"]), r["job"], RunStatus(r["status"]), RunStatus(r["previous_status"]), r["attempt"]
            )
            for r in rows
        ]

    async def log(
        self,
        refs: Sequence[tuple[str, int, str]],
        *,
        type_: str,
        source: str,
        data: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Write runherd's own lines into the event log: (run_id, attempt, message) each."""
        if not refs:
            return
        await self.conn.execute(
            q("log_event"),
            _ids([r[0] for r in refs]),
            [r[1] for r in refs],
            [r[2] for r in refs],
            source,
            type_,
            list(data) if data is not None else [{} for _ in refs],
        )

    async def notify_launcher(self) -> None:
        await self.conn.execute("SELECT pg_notify($1, '')", LAUNCH_CHANNEL)

    async def run_for_update(self, run_id: str) -> asyncpg.Record | None:
        return await self.conn.fetchrow(q("run_for_update"), UUID(run_id))

    async def lock_runs(self, run_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
        """Lock these runs (in run_id order, so two lockers never deadlock) and return them."""
        ids = _ids(sorted(set(run_ids)))
        rows = await self.conn.fetch(q("runs_for_update"), ids)
        await self.conn.execute(q("current_attempts_for_update"), ids)
        return {str(r["run_id"]): r for r in rows}

    async def insert_event(
        self,
        *,
        run_id: str,
        attempt: int,
        source: str,
        seq: int | None,
        type_: str,
        step_key: str | None,
        message: str | None,
        data: dict[str, Any],
        refused: str | None,
        ts: datetime,
    ) -> bool:
        """False when the event is a redelivery (already in the log)."""
        row = await self.conn.fetchval(
            q("insert_event"), UUID(run_id), attempt, source, seq, type_, step_key, message, data, refused, ts
        )
        return row is not None

    async def step_events(self, rows: Sequence[tuple[Any, ...]]) -> dict[str, int]:
        """step_event for many: rows of (run_id, attempt, source, seq, type, step_key, message, data, ts,
        status, output). Returns how many new events of each type were applied."""
        columns = list(zip(*rows, strict=True))
        data = [orjson.dumps(d).decode() for d in columns[7]]
        outputs = [None if o is None else orjson.dumps(o).decode() for o in columns[10]]
        result = await self.conn.fetch(q("step_events"), _ids(columns[0]), *columns[1:7], data, *columns[8:10], outputs)
        return {r["type"]: r["n"] for r in result}

    async def worker_exits(self, rows: Sequence[tuple[Any, ...]]) -> set[tuple[str, int]]:
        """WORKER_EXITED events appended and their exits recorded, for many: rows of (run_id, attempt,
        source, seq, message, data, ts, exit_code, reason). Returns the (run_id, attempt) appended
        (a redelivered event is not)."""
        columns = list(zip(*rows, strict=True))
        data = [orjson.dumps(d).decode() for d in columns[5]]
        result = await self.conn.fetch(q("exits_with_records"), _ids(columns[0]), *columns[1:5], data, *columns[6:9])
        return {(str(r["run_id"]), r["attempt"]) for r in result}

    async def record_exit(self, run_id: str, attempt: int, exit_code: int | None, reason: str | None) -> None:
        await self.conn.execute(q("record_exit"), UUID(run_id), attempt, exit_code, reason)

    async def resume(self, crashed: Sequence[tuple[str, int, str]], max_resumes: int) -> list[RunRef]:
        """Resume each (run_id, crashed attempt, why) with resumes left; returns the new attempts."""
        if not crashed:
            return []
        rows = await self.conn.fetch(
            q("resume"), _ids([c[0] for c in crashed]), [c[1] for c in crashed], max_resumes, [c[2] for c in crashed]
        )
        if rows:
            await self.notify_launcher()
            await self.conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return [RunRef(str(r["run_id"]), r["attempt"]) for r in rows]

    async def handles(self, run_ids: Sequence[str | UUID]) -> list[RunRef]:
        rows = await self.conn.fetch(q("attempt_handles"), _ids(run_ids))
        return [RunRef(str(r["run_id"]), r["attempt"], r["handle"]) for r in rows]

    async def violators(self, rule: str, *args: Any) -> list[asyncpg.Record]:
        """Runs breaking a monitor rule (locked, SKIP LOCKED): stuck_starting, stuck_canceling,
        over_max_runtime, silent_workers."""
        return await self.conn.fetch(q(rule), *args)


class Store:
    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self.url = url

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        check_schema: bool = True,
        statement_timeout: float = STATEMENT_TIMEOUT_SECONDS,
        read_only: bool = False,
    ) -> Store:
        """``read_only``: every transaction of the pool is READ ONLY (`runherd ui`), whatever the role."""
        settings = {"statement_timeout": str(int(statement_timeout * 1000))}
        if read_only:
            settings["default_transaction_read_only"] = "on"
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                init=_init,
                # A stuck statement (a lock wait, a hung server) fails and is retried instead of
                # holding the service; the client-side timeout covers a silent network.
                command_timeout=statement_timeout + 5,
                server_settings=settings,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {redact(url)}: {exc}") from exc
        assert pool is not None
        store = cls(pool, url)
        if check_schema:
            async with pool.acquire() as conn:
                version = await current_version(conn)
            if version < SCHEMA_VERSION:
                await pool.close()
                raise NotMigrated(
                    f"database {redact(url)} is not migrated (schema {version}, "
                    f"need {SCHEMA_VERSION}): run `runherd migrate`"
                )
        return store

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self, timeout: float = 2.0) -> None:
        """Raises unless PostgreSQL answers a trivial query within ``timeout`` (for /readyz)."""
        async with self.pool.acquire(timeout=timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=timeout)

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield Tx(conn)

    # --- launches ------------------------------------------------------------------------

    async def insert_runs(self, launches: Sequence[tuple[Launch, float | None, int]]) -> set[str]:
        """Insert a batch of ``(launch, max_runtime_seconds, priority)`` as QUEUED runs in one
        transaction (one statement); returns the run ids inserted (the others existed already)."""
        if not launches:
            return set()
        rows = [_queued_row(launch, max_runtime, priority) for launch, max_runtime, priority in launches]
        async with self.tx() as tx:
            inserted = await tx.conn.fetch(q("insert_runs"), rows)
            if inserted:
                await tx.notify_launcher()
                await tx.conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return {str(r["run_id"]) for r in inserted}

    async def insert_run(
        self,
        launch: Launch,
        *,
        max_runtime_seconds: float | None,
        priority: int,
        parent_run_id: str | None = None,
        root_run_id: str | None = None,
        retry_number: int = 0,
        delay_seconds: float = 0,
        reused_steps: dict[str, Any] | None = None,
    ) -> bool:
        """Insert a QUEUED run (a retry or re-execution: with its lineage, delay and reused steps);
        False when the run_id exists already (a duplicate launch). The same statement as a batch."""
        row = _queued_row(launch, max_runtime_seconds, priority)
        row |= {
            "parent_run_id": parent_run_id,
            "root_run_id": root_run_id,
            "retry_number": retry_number,
            "delay_seconds": float(delay_seconds),
        }
        async with self.tx() as tx:
            if not await tx.conn.fetch(q("insert_runs"), [row]):
                return False
            if reused_steps:
                await tx.conn.executemany(
                    "INSERT INTO steps (run_id, step_key, status, attempt, output, reused, ended_at) "
                    "VALUES ($1, $2, 'SUCCESS', 0, $3, true, now())",
                    [(UUID(launch.run_id), key, out) for key, out in reused_steps.items()],
                )
            await tx.notify_launcher()
            await tx.conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
            return True

    async def dequeue(self, max_concurrent: int, limits: list[dict[str, Any]], batch: int = 100) -> list[str]:
        """QUEUED -> STARTING for the next runs that fit every limit (at most ``batch``), in one
        statement (``dequeue_move``: the exact walk of ``dequeue``, so no second round can find
        more). One dequeuer at a time across launcher replicas (a transaction-level advisory lock):
        each walks the in-flight counts as committed by the one before it, so together they never
        exceed a limit."""
        async with self.tx() as tx:
            await tx.conn.execute("SELECT pg_advisory_xact_lock($1)", _DEQUEUE_LOCK)
            rows = await tx.conn.fetch(dequeue_query(limits, move=True), max_concurrent, limits, batch)
            if rows:
                await tx.conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return [str(r["run_id"]) for r in rows]

    async def claim_launches(self, limit: int, lease_seconds: float) -> list[LaunchClaim]:
        async with self.tx() as tx:
            rows = await tx.conn.fetch(q("claim_launches"), limit, float(lease_seconds))
            if not rows:
                return []
            done = await tx.conn.fetch(q("completed_steps"), [r["run_id"] for r in rows])
            retried = await tx.conn.fetch(q("step_tries"), [r["run_id"] for r in rows if r["attempt"] > 1])
        completed: dict[str, dict[str, Any]] = {}
        for row in done:
            completed.setdefault(str(row["run_id"]), {})[row["step_key"]] = row["output"]
        tries: dict[str, dict[str, Any]] = {}
        for row in retried:
            tries.setdefault(str(row["run_id"]), {})[row["step_key"]] = {
                "failed_tries": row["failed_tries"],
                "retry_at": row["retry_at"],
            }
        return [
            LaunchClaim(
                run_id=str(r["run_id"]),
                attempt=r["attempt"],
                job=r["job"],
                status=RunStatus(r["status"]),
                current_attempt=r["current_attempt"],
                tags=r["tags"],
                steps=r["steps"],
                env=r["env"],
                launcher=r["launcher"],
                max_runtime_seconds=r["max_runtime_seconds"],
                completed=completed.get(str(r["run_id"]), {}),
                step_tries=tries.get(str(r["run_id"]), {}),
            )
            for r in rows
        ]

    async def record_launches(
        self, launched: Sequence[tuple[str, int, dict[str, Any], str]]
    ) -> list[tuple[RunStatus, int] | None]:
        """Store the handles of (run_id, attempt, handle, launcher) in one statement; returns each
        run's status and current attempt as they are now, in the same order (None: no such attempt)."""
        if not launched:
            return []
        rows = await self.pool.fetch(
            q("record_launches"),
            [UUID(x[0]) for x in launched],
            [x[1] for x in launched],
            [x[2] for x in launched],
            [x[3] for x in launched],
        )
        now = {(str(r["run_id"]), r["attempt"]): (RunStatus(r["status"]), r["current_attempt"]) for r in rows}
        return [now.get((x[0], x[1])) for x in launched]

    async def live_handles(self) -> list[RunRef]:
        rows = await self.pool.fetch(q("live_handles"))
        return [RunRef(str(r["run_id"]), r["attempt"], r["handle"]) for r in rows]

    # --- heartbeats -----------------------------------------------------------------------

    async def record_heartbeats(
        self, beats: Sequence[tuple[str, int] | tuple[str, int, datetime]], *, replica: str | None = None
    ) -> int:
        """One set-based statement per batch; returns how many attempts were touched. The last-seen
        time written is the database's clock (a heartbeat's own ``ts``, if given, is not used).
        Canaries in the batch advance ``replica``'s heard-through watermark."""
        if not beats:
            return 0
        return await self.pool.fetchval(
            q("record_heartbeats"), _ids([b[0] for b in beats]), [b[1] for b in beats], replica
        )

    async def issue_canaries(self, replica: str, nonces: Sequence[int]) -> tuple[list[int], int]:
        """Register canaries for ``replica`` to publish (and mark the replica alive), stamped with
        the database's time now; returns the nonces issued (a taken one is not) and how many
        heartbeat replicas were seen in the last 2 s."""
        row = await self.pool.fetchrow(q("issue_canaries"), replica, list(nonces))
        assert row is not None
        return list(row["nonces"]), row["replicas"]

    async def forget_replica(self, replica: str) -> None:
        await self.pool.execute(q("forget_replica"), replica)

    async def issue_event_canary(self, nonce: int) -> datetime | None:
        """Register an event canary; returns its stamp (the database's time now), None if the nonce is taken."""
        return await self.pool.fetchval(q("issue_event_canary"), nonce)

    async def record_event_canaries(self, nonces: Sequence[int]) -> None:
        """Every event published before these canaries is applied: advance the event watermark."""
        if nonces:
            await self.pool.execute(q("record_event_canaries"), list(nonces))

    # --- sharded event ingest (event_shards > 1) -----------------------------------------

    async def monitor_lease(self, replica: str, lease_seconds: float) -> list[str]:
        """Renew ``replica``'s lease; returns the live monitor replicas, itself included."""
        return [r["replica"] for r in await self.pool.fetch(q("monitor_lease"), replica, lease_seconds)]

    async def forget_monitor(self, replica: str) -> None:
        await self.pool.execute(q("forget_monitor"), replica)

    async def issue_event_canary_round(self, nonces: Sequence[int]) -> bool:
        """Register a round of event canaries sharing one stamp; False (nothing kept) if a nonce is taken."""
        inserted = [r["nonce"] for r in await self.pool.fetch(q("issue_event_canary_round"), list(nonces))]
        if len(inserted) == len(nonces):
            return True
        await self.pool.execute(q("withdraw_event_canaries"), inserted)
        return False

    async def record_event_canary_rounds(self, nonces: Sequence[int]) -> bool:
        """These canaries are applied; True if that completed a round and moved the event watermark."""
        if not nonces:
            return False
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(q("lock_event_watermark"))
            return bool(await conn.fetchval(q("record_event_canary_rounds"), list(nonces)))

    async def event_keys(self) -> Keys:
        """The services' key for event and heartbeat tokens (made by ``runherd migrate``)."""
        row = await self.pool.fetchrow(q("event_keys"))
        if row is None:
            raise NotMigrated("the event key is missing (table runherd_keys): run `runherd migrate`")
        return Keys(bytes(row["key"]), bytes(row["previous"]) if row["previous"] is not None else None)

    async def heard_lag(self) -> float | None:
        """Seconds the workers are heard behind the database's clock (heartbeats and events); None:
        not heard at all."""
        return await self.pool.fetchval(q("heard_lag"))

    # --- monitor --------------------------------------------------------------------------

    async def claim_reaps(self, grace_seconds: float, lease_seconds: float, limit: int) -> list[RunRef]:
        rows = await self.pool.fetch(q("claim_reaps"), float(grace_seconds), float(lease_seconds), limit)
        return [RunRef(str(r["run_id"]), r["attempt"], r["handle"]) for r in rows]

    async def mark_exited(self, run_id: str, attempt: int, exit_code: int | None, reason: str | None) -> None:
        await self.pool.execute(q("record_exit"), UUID(run_id), attempt, exit_code, reason)

    # --- outbox -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def outbox_leadership(self) -> AsyncIterator[asyncpg.Connection | None]:
        """Yields a connection if this process is the outbox relay (session advisory lock)."""
        async with self.pool.acquire() as conn:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", _OUTBOX_LOCK)
            try:
                yield conn if got else None
            finally:
                if got:
                    with contextlib.suppress(*TransientDbError):
                        await conn.execute("SELECT pg_advisory_unlock($1)", _OUTBOX_LOCK)

    @staticmethod
    async def outbox_batch(conn: asyncpg.Connection, limit: int) -> list[tuple[int, str, bytes]]:
        rows = await conn.fetch(q("outbox_batch"), limit)
        return [(r["id"], r["routing_key"], r["body"].encode()) for r in rows]

    @staticmethod
    async def outbox_delete(conn: asyncpg.Connection, ids: list[int]) -> None:
        await conn.execute(q("outbox_delete"), ids)

    async def listen(self, channel: str, callback: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Call ``callback`` on each NOTIFY; returns an async function that stops listening."""
        conn = await asyncpg.connect(self.url)

        def on_notify(*_: Any) -> None:
            callback()

        await conn.add_listener(channel, on_notify)

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

        return stop

    # --- reading ----------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(q("get_run"), UUID(run_id))
        if row is None:
            return None
        run = dict(row)
        run["steps_status"] = [dict(r) for r in await self.pool.fetch(q("get_steps"), UUID(run_id))]
        return run

    async def list_runs(self, status: str | None, job: str | None, limit: int) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(q("list_runs"), status, job, limit)]

    async def list_events(self, run_id: str, after_id: int = 0) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(q("list_events"), UUID(run_id), after_id)]

    async def count_attempts(self, run_ids: Sequence[str]) -> dict[str, int]:
        rows = await self.pool.fetch(q("count_attempts"), _ids(run_ids))
        return {str(r["run_id"]): r["n"] for r in rows}

    async def rule_deadlines(
        self,
        heartbeat_timeout: float,
        start_grace: float,
        start_timeout: float,
        cancel_timeout: float,
        max_runtime: float,
        cached: StartedPass | None = None,
    ) -> Deadlines:
        """Seconds until each monitor rule falls due, and whether retries wait (one statement).
        With ``cached`` (an earlier pass over the STARTED runs) the pass is skipped unless a run
        has become STARTED since."""
        row = dict(
            await self.pool.fetchrow(
                q("rule_deadlines"),
                float(heartbeat_timeout),
                float(start_grace),
                float(start_timeout),
                float(cancel_timeout),
                float(max_runtime),
                cached.version if cached else None,
                cached.beat if cached else None,
                cached.unheard if cached else None,
                cached.untagged if cached else None,
                cached.tagged if cached else None,
            )
            or {}
        )
        started = StartedPass(**{k: row.pop(k) for k in StartedPass.__dataclass_fields__})
        return Deadlines(**row, started=started)

    async def starting_due(self, start_timeout: float) -> float | None:
        """Seconds until the earliest STARTING run's start deadline (before the watermark's lag)."""
        value: float | None = await self.pool.fetchval(q("starting_due"), float(start_timeout))
        return value

    async def count_active(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in await self.pool.fetch(q("count_active"))}

    async def ops_gauges(self) -> dict[str, float | None]:
        """oldest_queued_seconds, outbox_backlog, heard_through_lag_seconds (queries_ops.sql)."""
        row = await self.pool.fetchrow(q("ops_gauges"))
        return {k: (None if v is None else float(v)) for k, v in dict(row or {}).items()}

    async def in_flight(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(q("in_flight_by_limit"))]

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """For tests and the CLI's ad-hoc reads only; services use the domain methods."""
        return [dict(r) for r in await self.pool.fetch(sql, *args)]

    # --- pruning (runherd prune) ------------------------------------------------------------

    async def prune_preview(self, older_than_seconds: float) -> dict[str, Any]:
        """What prune_batch would delete, counted; deletes nothing."""
        return dict(await self.pool.fetchrow(q("prune_preview"), float(older_than_seconds)) or {})

    async def prune_batch(self, older_than_seconds: float, batch: int) -> tuple[int, int]:
        """Delete up to ``batch`` finished runs (and their rows) in one transaction: (runs, events)."""
        row = await self.pool.fetchrow(q("prune_batch"), float(older_than_seconds), batch)
        assert row is not None
        return row["runs"], row["events"]
