"""Least privilege in PostgreSQL (issue 9, item 5): scripts/postgres-roles.sql makes an owner, a
service and a reader role; `runherd migrate` runs as the owner (no superuser), a run goes to SUCCESS
through the services connected as the service role, and neither the service nor the reader role can
do more than its grants. The roles get unique names and are dropped after: the machine's own roles
are never altered."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import pytest

from runherd.store import Store, migrate
from runherd.store.migrate import migrations
from tests import harness

SCRIPT = harness.ROOT / "scripts" / "postgres-roles.sql"
STEP = {"key": "hello", "command": ["true"]}


@dataclass(frozen=True)
class Roles:
    database: str
    owner: str
    service: str
    reader: str
    evil: str  # a role name nobody may create: dropped after in case a check failed

    def url(self, role: str) -> str:
        parts = urlsplit(harness.PG)
        return f"postgresql://{role}@{parts.hostname}:{parts.port or 5432}/{self.database}"


def _psql(roles: Roles) -> None:
    names = {"database": roles.database, "owner": roles.owner, "service": roles.service, "reader": roles.reader}
    args = [f"--set={k}={v}" for k, v in names.items()]
    args += [f"--set={k}_password=pw-{uuid.uuid4().hex}" for k in ("owner", "service", "reader")]
    subprocess.run(
        ["psql", "-X", "-q", "--set=ON_ERROR_STOP=1", *args, "-f", str(SCRIPT), f"{harness.PG}/postgres"],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
async def roles() -> AsyncIterator[Roles]:
    tag = uuid.uuid4().hex[:10]
    made = Roles(f"runherd_roles_{tag}", f"rh_owner_{tag}", f"rh_service_{tag}", f"rh_reader_{tag}", f"rh_evil_{tag}")
    try:
        await asyncio.to_thread(_psql, made)
        yield made
    finally:
        admin = await asyncpg.connect(f"{harness.PG}/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{made.database}" WITH (FORCE)')
            for role in (made.owner, made.service, made.reader, made.evil):
                await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()


async def _refused(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_migrate_as_owner_run_as_service_read_as_reader(env: harness.Env, roles: Roles) -> None:
    # The owner is no superuser, yet migrates from nothing; the script is safe to run again after.
    assert await migrate(roles.url(roles.owner)) == [name for _, name, _ in migrations()]
    await asyncio.to_thread(_psql, roles)
    admin = await asyncpg.connect(roles.url("postgres"))
    try:
        powers = "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = $1"
        assert not await admin.fetchval(powers, roles.owner)
        owners = await admin.fetch("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
        assert [r["tableowner"] for r in owners] == [roles.owner]
    finally:
        await admin.close()

    # The happy path through the services, connected as the service role.
    await env.start(cfg=env.configure(database_url=roles.url(roles.service)))
    reader = await Store.connect(roles.url(roles.reader), max_size=2)
    try:
        run_id = await env.submit([STEP], job="least-privilege")

        async def finished() -> dict[str, object] | None:
            run = await reader.get_run(run_id)
            return run if run is not None and run["status"] in ("SUCCESS", "FAILURE") else None

        run = await harness.eventually(finished, 30, what="the run to finish")
        assert run["status"] == "SUCCESS"
        assert [e["type"] for e in await reader.list_events(run_id)].count("STEP_SUCCESS") == 1
    finally:
        await reader.close()

    service, read_only = roles.url(roles.service), roles.url(roles.reader)
    for statement in (
        "DROP TABLE runs",
        "ALTER TABLE runs ADD COLUMN evil integer",
        "TRUNCATE events",
        "CREATE TABLE evil (x integer)",
        "CREATE FUNCTION evil() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        f'CREATE ROLE "{roles.evil}" SUPERUSER LOGIN',
        f'GRANT "{roles.owner}" TO "{roles.service}"',
    ):
        await _refused(service, statement)
    for statement in (
        "INSERT INTO runherd_schema (version, name) VALUES (999, 'evil')",
        f"UPDATE runs SET status = 'FAILURE' WHERE run_id = '{run_id}'",
        "DELETE FROM events",
        "DROP TABLE events",
        f'CREATE ROLE "{roles.evil}"',
    ):
        await _refused(read_only, statement)
