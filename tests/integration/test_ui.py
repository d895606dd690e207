"""`runherd ui` over plain HTTP against real PostgreSQL and RabbitMQ: it reads through a read-only
role, asks for credentials when configured, changes nothing unless actions are on (and then only by
the normal commands), peeks at dead letters without taking them, and pages runs through indexes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from runherd.broker import DEAD_QUEUE
from runherd.config import Config, Ui
from runherd.store import ui as reads
from runherd.ui import model, server
from runherd.ui.data import now
from tests import harness
from tests.harness import Env, eventually

Start = Callable[..., Awaitable[server.Running]]


@pytest.fixture
async def ui(env: Env) -> AsyncIterator[Start]:
    started: list[server.Running] = []

    async def start(**ui_keys: Any) -> server.Running:
        cfg: Config = replace(env.cfg, ui=replace(env.cfg.ui, **ui_keys))
        started.append(await server.start(cfg, host="127.0.0.1", port=0))
        return started[-1]

    try:
        yield start
    finally:
        for running in started:
            await running.close()


async def get(url: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as response:
        return response.status, await response.text()


async def test_every_page_renders_through_a_read_only_role_and_the_pool_cannot_write(env: Env, ui: Start) -> None:
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(run_id, "SUCCESS")
    role = f"runherd_ui_ro_{uuid.uuid4().hex[:8]}"
    db = env.db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(f"{harness.PG}/postgres")
    owner = await asyncpg.connect(env.db_url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'GRANT CONNECT ON DATABASE "{db}" TO "{role}"')
        await owner.execute(
            f'GRANT USAGE ON SCHEMA public TO "{role}"; GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"'
        )
        url = (await ui(database_url=f"postgresql://{role}@127.0.0.1:5432/{db}")).url
        for path in ("/", f"/runs/{run_id}", "/queue", "/fleet", "/?status=SUCCESS&tag=x&within=1h"):
            status, text = await get(url + path)
            assert status == 200, (path, text[:500])
        assert run_id in (await get(url + "/"))[1]
        # Even the owner's URL gives the UI read-only sessions.
        owners = await ui()
        assert (await get(owners.url + "/"))[0] == 200
        with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
            await owners.store.pool.execute("UPDATE runs SET reason = 'x'")
    finally:
        await owner.execute(
            f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{role}"; REVOKE ALL ON SCHEMA public FROM "{role}"'
        )
        await owner.close()
        await admin.execute(f'REVOKE ALL ON DATABASE "{db}" FROM "{role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_basic_auth_when_configured(env: Env, ui: Start) -> None:
    url = (await ui(basic_auth_user="ops", basic_auth_password="s3cret")).url
    status, _ = await get(url + "/")
    assert status == 401
    assert (await get(url + "/", headers=_basic("ops", "wrong")))[0] == 401
    assert (await get(url + "/live", headers=_basic("ops", "wrong")))[0] == 401
    assert (await get(url + "/fleet", headers=_basic("ops", "s3cret")))[0] == 200


def _basic(user: str, password: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def post(url: str, data: dict[str, str] | None = None, origin: str | None = None) -> tuple[int, str]:
    headers = {"Origin": origin} if origin else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=data or {}, headers=headers, allow_redirects=False) as response,
    ):
        return response.status, response.headers.get("Location", "") or await response.text()


async def test_no_page_changes_a_run_unless_actions_are_on_and_then_by_the_normal_commands(env: Env, ui: Start) -> None:
    env.configure(run_coordinator={"max_concurrent_runs": 0})  # everything stays QUEUED
    await env.start({"launcher": 1})
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(run_id, "QUEUED")
    closed = (await ui()).url
    status, text = await post(f"{closed}/runs/{run_id}/cancel", origin=closed)
    assert status == 403 and "ui.allow_actions" in text
    assert "Cancel run" not in (await get(f"{closed}/runs/{run_id}"))[1]
    assert await env.status(run_id) == "QUEUED"

    opened = (await ui(allow_actions=True)).url
    assert 'id="cancel"' in (await get(f"{opened}/runs/{run_id}"))[1]
    assert (await post(f"{opened}/runs/{run_id}/cancel", origin="http://elsewhere.example"))[0] == 403
    assert (await post(f"{opened}/runs/{run_id}/cancel"))[0] == 403  # no Origin, no Referer
    status, location = await post(f"{opened}/runs/{run_id}/cancel", origin=opened)
    assert status == 303 and location.startswith(f"/runs/{run_id}")
    await env.wait_status(run_id, "CANCELED")
    status, location = await post(f"{opened}/runs/{run_id}/reexecute", {"strategy": "ALL_STEPS"}, origin=opened)
    assert status == 303
    new_id = location.split("?")[0].rsplit("/", 1)[1]

    async def stored() -> bool:
        return await env.run(new_id) is not None

    await eventually(stored, what="the re-execution stored by the launcher")
    new = await env.run(new_id)
    assert new is not None and str(new["parent_run_id"]) == run_id


async def test_dead_letters_are_shown_with_their_reasons_and_left_in_the_queue(env: Env, ui: Start) -> None:
    await env.start({"launcher": 1})
    await env.broker.publish_command("launch", orjson.dumps({"v": 1, "job": "broken", "steps": []}))
    await env.broker.publish_command("launch", b"not json")

    async def dead() -> bool:
        stats = await env.broker.queue_stats(DEAD_QUEUE)
        return stats is not None and stats[0] == 2

    await eventually(dead, what="two dead letters")
    _, page = await get((await ui()).url + "/fleet")
    assert "a run needs at least one step" in page and "not json" in page
    # A second UI peeks again (the first caches its peek for a few seconds): they are still there.
    _, again = await get((await ui()).url + "/fleet")
    assert "a run needs at least one step" in again
    await eventually(dead, what="both dead letters still in the queue")


ALL = ("QUEUED", "STARTING", "STARTED", "CANCELING", "SUCCESS", "FAILURE", "CANCELED")
QUERIES = [{}, {"status": "FAILURE"}, {"job": "j3"}, {"tag": "team=t1"}, {"status": "SUCCESS", "within": "1h"}]


async def test_a_page_is_an_index_scan_never_a_scan_of_every_run(env: Env) -> None:
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, tags, steps, root_run_id, created_at) "
        "SELECT u, 'j' || (i % 10), CASE WHEN i % 20 = 0 THEN 'FAILURE' ELSE 'SUCCESS' END, "
        "jsonb_build_object('team', 't' || (i % 8)), '[]'::jsonb, u, now() - make_interval(secs => i) "
        "FROM (SELECT gen_random_uuid() AS u, i FROM generate_series(1, 20000) i) s"
    )
    await env.store.pool.execute("ANALYZE runs")
    for query in QUERIES:
        q = model.parse_list_query(query, now())
        first = await reads.runs_page(env.store, q.filter, 3)
        cursor = reads.Cursor(first[-1]["created_at"], first[-1]["run_id"])
        for after in (None, cursor):
            sql, args = reads.page_sql(q.filter, 51, after)
            plan = await env.store.pool.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
            plan = plan if isinstance(plan, list) else orjson.loads(plan)
            scans = _scans(plan[0]["Plan"])
            assert ("Seq Scan", "runs") not in scans, (query, scans)
            assert any(name.startswith("runs_") for _, name in scans), scans
        # The page after the cursor is exactly the runs after it, newest first.
        page = await reads.runs_page(env.store, q.filter, 3, older_than=cursor)
        keys = [(r["created_at"], r["run_id"]) for r in page]
        assert keys and keys == sorted(keys, reverse=True) and keys[0] < (cursor.created_at, cursor.run_id)
        # And the page before it leads back to the first.
        back = await reads.runs_page(env.store, q.filter, 2, newer_than=reads.Cursor(*keys[0]))
        assert [r["run_id"] for r in back] == [r["run_id"] for r in first[1:]]
    # Counts per status: capped without a job or tag filter (each through its own index), exact with one.
    none = reads.RunFilter()
    counts = {**dict.fromkeys(ALL, 0), "SUCCESS": 10_000, "FAILURE": 1000}
    assert await reads.status_counts(env.store, none) == (counts, {"SUCCESS"})
    assert (await reads.status_counts(env.store, none, cap=300))[0]["FAILURE"] == 300
    assert await reads.status_counts(env.store, reads.RunFilter(job="j0")) == (
        {"SUCCESS": 1000, "FAILURE": 1000},
        set(),
    )
    capped, at_least = await reads.status_counts(env.store, reads.RunFilter(job="j0"), cap=500)
    assert sum(capped.values()) == 500 and at_least == set(ALL)
    sql = reads._render("ui_status_counts", reads._where(none, with_status=False))
    plan = await env.store.pool.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", 10_000)
    plan = plan if isinstance(plan, list) else orjson.loads(plan)
    # Each status's scan stops at the cap (a Limit above it), whichever way the planner reads it.
    assert _unlimited_scans(plan[0]["Plan"]) == []


def _unlimited_scans(plan: dict[str, Any], limited: bool = False) -> list[str]:
    found = []
    if "Scan" in str(plan.get("Node Type", "")) and not limited and plan.get("Relation Name") == "runs":
        found.append(str(plan["Node Type"]))
    limited = limited or plan.get("Node Type") == "Limit"
    for child in plan.get("Plans", []) or []:
        found.extend(_unlimited_scans(child, limited))
    return found


def _scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    if "Scan" in str(plan.get("Node Type", "")):
        found.append((str(plan["Node Type"]), str(plan.get("Index Name") or plan.get("Relation Name"))))
    for child in plan.get("Plans", []) or []:
        found.extend(_scans(child))
    return found


def test_ui_config_defaults_are_safe() -> None:
    ui = Ui()
    assert ui.allow_actions is False and ui.host == "127.0.0.1" and ui.database_url is None


async def test_the_fleet_page_shows_which_event_shards_each_live_monitor_holds(env: Env) -> None:
    """With ``event_shards: 4``, the live monitor replicas split the shards as the monitors do
    (runherd.sharding); a replica past its lease is shown gone and holds none."""
    from runherd import sharding

    await env.store.pool.execute(
        "INSERT INTO monitor_replicas (replica, seen_at) VALUES ('mon-a', clock_timestamp()), "
        "('mon-b', clock_timestamp()), ('mon-dead', clock_timestamp() - interval '1 minute')"
    )
    running = await server.start(replace(env.cfg, event_shards=4), host="127.0.0.1", port=0)
    try:
        _, page = await get(running.url + "/fleet")
    finally:
        await running.close()
    assert "sharded over 4 queues" in page
    for replica in ("mon-a", "mon-b"):
        held = ", ".join(str(s) for s in sorted(sharding.assigned(replica, ["mon-a", "mon-b"], 4)))
        assert f'<td class="mono">{replica}</td><td>✔</td><td class="mono">{held or "—"}</td>' in page
    assert '<td class="mono">mon-dead</td><td>✕ gone</td><td class="mono">—</td>' in page
