"""`runherd migrate`: create or upgrade the schema, safely when run twice or by many at once."""

from __future__ import annotations

import logging
import re
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("runherd.migrate")
_LOCK = 0x52484D47  # "RHMG"


def migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("runherd.store").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


SCHEMA_VERSION = max(v for v, _, _ in migrations())


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('runherd_schema') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM runherd_schema")


async def _ensure_database(url: str) -> None:
    """Create the database itself if it does not exist (a fresh machine has none)."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        parts = urlsplit(url)
        name = parts.path.lstrip("/")
        admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
            log.info("created database %s", name)
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):  # another migrate won the race
            pass
        finally:
            await admin.close()
        return
    await conn.close()


async def migrate(url: str) -> list[str]:
    """Apply the missing migrations in order; returns the names applied."""
    await _ensure_database(url)
    conn = await asyncpg.connect(url)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS runherd_schema ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = await current_version(conn)
        for version, name, sql in migrations():
            if version <= have:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO runherd_schema (version, name) VALUES ($1, $2)", version, name)
            applied.append(name)
            log.info("applied migration %s", name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
        await conn.close()
    return applied
