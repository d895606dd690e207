"""The monitor's rules and the dequeue read in-flight or queued runs through partial indexes, never
by visiting every run; and an older schema is upgraded by `runherd migrate`."""

from __future__ import annotations

import uuid

import asyncpg
import orjson
import pytest

from runherd.store.migrate import SCHEMA_VERSION, migrate, migrations
from runherd.store.queries import dequeue_query, q
from runherd.store.store import Store
from tests import harness
from tests.harness import Env

# rule -> (its arguments, the partial index it must read through)
RULES = {
    "stuck_starting": (10.0, 100),
    "stuck_canceling": (10.0, 100),
    "over_max_runtime": (60.0, 100),
    "silent_workers": (30.0, 100, 180.0),
    "rule_deadlines": (30.0, 180.0, 180.0, 180.0, 0.0, None, None, None, None, None),
    "dequeue": (
        10,
        orjson.dumps([{"key": "team", "value": "a", "per_unique_value": False, "limit": 2}]).decode(),
        100,
    ),
    "claim_reaps": (30.0, 5.0, 100),
}
INDEXES = {"claim_reaps": ("attempts_to_reap",)}


async def _fill(env: Env, finished: int, in_flight: int) -> None:
    steps = orjson.dumps([{"key": "a", "command": ["true"], "deps": []}]).decode()
    ids = [uuid.uuid4() for _ in range(finished + in_flight)]
    statuses = ["SUCCESS"] * finished + ["STARTED"] * (in_flight // 2) + ["QUEUED"] * (in_flight - in_flight // 2)
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, steps, root_run_id, started_at) "
        "SELECT u, 'j', s, 1, $3::jsonb, u, now() FROM unnest($1::uuid[], $2::text[]) AS x(u, s)",
        ids,
        statuses,
        steps,
    )
    await env.store.pool.execute(
        "INSERT INTO attempts (run_id, attempt, launched_at) SELECT run_id, 1, now() FROM runs"
    )
    await env.store.pool.execute("ANALYZE runs")
    await env.store.pool.execute("ANALYZE attempts")


def _scans(plan: dict[str, object]) -> list[tuple[str, str]]:
    """(node type, relation or index) of every scan in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    node = plan
    if "Scan" in str(node.get("Node Type", "")):
        found.append((str(node["Node Type"]), str(node.get("Index Name") or node.get("Relation Name"))))
    for child in node.get("Plans", []) or []:  # type: ignore[union-attr]
        found.extend(_scans(child))  # type: ignore[arg-type]
    return found


@pytest.mark.parametrize("rule", sorted(RULES))
async def test_rule_queries_use_partial_indexes_not_a_scan_of_all_runs(env: Env, rule: str) -> None:
    await _fill(env, finished=20_000, in_flight=20)
    async with env.store.tx() as tx:
        await tx.conn.execute("SET LOCAL enable_seqscan = on")
        sql = dequeue_query(orjson.loads(RULES[rule][1])) if rule == "dequeue" else q(rule)
        plan = await tx.conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *RULES[rule])
    plan = plan if isinstance(plan, list) else orjson.loads(plan)
    scans = _scans(plan[0]["Plan"])
    assert scans, plan
    assert ("Seq Scan", "runs") not in scans and ("Seq Scan", "attempts") not in scans, scans
    expected = INDEXES.get(rule, ("runs_in_flight", "runs_queued"))
    assert any(name in expected for _, name in scans), scans


async def test_migrate_upgrades_an_older_schema() -> None:
    name = f"runherd_old_{uuid.uuid4().hex[:8]}"
    url = f"{harness.PG}/{name}"
    admin = await asyncpg.connect(f"{harness.PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        conn = await asyncpg.connect(url)  # a database left at schema 1 by an older runherd
        version, first, sql = migrations()[0]
        await conn.execute(
            "CREATE TABLE runherd_schema (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(sql)
        await conn.execute("INSERT INTO runherd_schema (version, name) VALUES ($1, $2)", version, first)
        await conn.close()
        with pytest.raises(Exception, match=f"schema 1, need {SCHEMA_VERSION}"):
            await Store.connect(url)
        applied = await migrate(url)
        assert applied == [m[1] for m in migrations()[1:]]
        store = await Store.connect(url)
        await store.close()
    finally:
        await harness.drop_database(name)
