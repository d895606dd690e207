"""Issue 5: the run queue. The dequeue statement itself against real PostgreSQL (no services), then
two launcher replicas sharing the limits, priority order end to end, and `runherd runs --status QUEUED`."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import yaml

from runherd.config import Config, RunCoordinator, TagConcurrencyLimit
from runherd.contract import Launch, Step
from runherd.launcher import commands
from runherd.rules.coordinator import group, pick
from runherd.store.queries import dequeue_query
from tests import harness
from tests.harness import Env, eventually

IN_FLIGHT = "('STARTING', 'STARTED', 'CANCELING')"


async def queue(
    env: Env,
    tags: dict[str, Any] | None = None,
    *,
    delay: float = 0,
    steps: tuple[Step, ...] = (Step(key="a", command=["true"]),),
) -> str:
    """Insert a QUEUED run straight into the store, as the launcher does for a launch message."""
    launch = Launch(run_id=str(uuid.uuid4()), job="queue-test", steps=steps, tags=tags or {})
    assert await commands.insert_launch(env.store, launch, delay_seconds=delay)
    return launch.run_id


async def cli(*args: str) -> tuple[int, str, str]:
    """`runherd ARGS...` as a subprocess: exit code, stdout, stderr."""
    return await harness.run_cli(*args)


def limits_of(cfg: Config) -> list[dict[str, Any]]:
    """The limits as services/launcher/launching.py hands them to Store.dequeue."""
    return [
        {"key": lim.key, "value": lim.value, "per_unique_value": lim.per_unique_value, "limit": lim.limit}
        for lim in cfg.run_coordinator.tag_concurrency_limits
    ]


def limit(key: str, cap: int, value: str | None = None, per_unique: bool = False) -> dict[str, Any]:
    return {"key": key, "value": value, "per_unique_value": per_unique, "limit": cap}


async def finish(env: Env, *run_ids: str) -> None:
    await env.store.fetch(
        "UPDATE runs SET status = 'SUCCESS' WHERE run_id = ANY($1::uuid[])", [uuid.UUID(r) for r in run_ids]
    )


async def test_tag_limits_by_key_by_key_and_value_and_per_unique_value(env: Env) -> None:
    limits = [limit("team", 2, "data"), limit("pool", 1), limit("database", 1, per_unique=True)]
    data = [await queue(env, {"team": "data"}) for _ in range(3)]
    ml = [await queue(env, {"team": "ml"}) for _ in range(2)]  # no limit on team=ml
    pool = [await queue(env, {"pool": v}) for v in ("x", "y")]  # one limit across every value
    db_a = [await queue(env, {"database": "a"}) for _ in range(2)]
    db_b = [await queue(env, {"database": "b"}) for _ in range(2)]
    moved = set(await env.store.dequeue(-1, limits))
    assert moved == {data[0], data[1], *ml, pool[0], db_a[0], db_b[0]}
    assert await env.store.dequeue(-1, limits) == []  # every remaining run is held by its limit
    await finish(env, data[0], pool[0], db_a[0])
    assert set(await env.store.dequeue(-1, limits)) == {data[2], pool[1], db_a[1]}
    assert await env.store.dequeue(-1, limits) == []
    assert await env.store.dequeue(-1, limits) == []
    await finish(env, db_b[0])
    assert await env.store.dequeue(-1, limits) == [db_b[1]]


async def test_global_limit_and_a_run_held_by_two_limits(env: Env) -> None:
    limits = [limit("team", 1, "data"), limit("database", 1, per_unique=True)]
    both = await queue(env, {"team": "data", "database": "a"})
    same_db = await queue(env, {"database": "a"})
    same_team = await queue(env, {"team": "data", "database": "b"})
    free = [await queue(env) for _ in range(3)]
    moved = await env.store.dequeue(3, limits)
    assert set(moved) == {both, free[0], free[1]}  # FIFO, both held runs skipped, global limit 3
    assert await env.store.dequeue(3, limits) == []
    await finish(env, free[0], free[1])
    # `same_db` and `same_team` are still held (database=a and team=data are taken): the free run goes.
    assert await env.store.dequeue(3, limits) == [free[2]]
    await finish(env, both)
    assert set(await env.store.dequeue(3, limits)) == {same_db, same_team}
    in_flight = await env.store.fetch(f"SELECT count(*) AS n FROM runs WHERE status IN {IN_FLIGHT}")
    assert in_flight[0]["n"] == 3


async def test_blocked_runs_never_hold_back_the_runs_behind_them(env: Env) -> None:
    limits = [limit("team", 1, "data"), limit("banned", 0)]
    first = await queue(env, {"team": "data"})
    assert await env.store.dequeue(-1, limits) == [first]
    blocked = [await queue(env, {"team": "data"}) for _ in range(6)]
    banned = [await queue(env, {"banned": "yes"}, steps=(Step(key="b", command=["true"]),)) for _ in range(6)]
    free = await queue(env)
    # 12 blocked runs queue ahead of `free`, and a batch of 1 still finds it.
    assert await env.store.dequeue(-1, limits, batch=1) == [free]
    assert await env.store.dequeue(-1, limits) == []
    assert blocked and banned


async def test_limits_of_zero_numeric_tag_values_and_one_free_slot_behind_held_runs(env: Env) -> None:
    """A per-value limit of 0 holds every value, a numeric tag value counts as its text, and with one
    global slot free the walk still finds the one run that fits behind 41 held ones."""
    limits = [limit("database", 0, per_unique=True), limit("team", 0, "data"), limit("shard", 1, per_unique=True)]
    held = [await queue(env, {"database": "a"}), await queue(env, {"team": "data"})]
    first = await queue(env, {"shard": 7})
    same_shard = await queue(env, {"shard": "7"})
    other = await queue(env, {"shard": 8})
    assert set(await env.store.dequeue(2, limits)) == {first, other}
    assert await env.store.dequeue(3, limits) == []  # shard 7 is taken, whether 7 or "7"
    await finish(env, other)
    behind = [await queue(env, {"shard": 7}) for _ in range(40)]
    free = await queue(env)
    assert await env.store.dequeue(2, limits) == [free]  # 41 held runs ahead, one slot free
    assert held and same_shard and behind


async def test_priority_then_fifo_and_both_tag_spellings(env: Env) -> None:
    names = {}
    for name, tags in [
        ("low", {"runherd/priority": -1}),
        ("plain1", {}),
        ("dagster5", {"dagster/priority": "5"}),
        ("plain2", {}),
        ("top", {"runherd/priority": 10}),
        ("runherd5", {"runherd/priority": 5}),
    ]:
        names[await queue(env, tags)] = name
    order = []
    for _ in names:
        [moved] = await env.store.dequeue(1, [])
        order.append(names[moved])
        await finish(env, moved)
    assert order == ["top", "dagster5", "runherd5", "plain1", "plain2", "low"]


async def test_backoff_delays_the_dequeue(env: Env) -> None:
    began = time.monotonic()
    delayed = await queue(env, delay=1.0)
    now = await queue(env)
    assert await env.store.dequeue(-1, []) == [now]

    async def dequeued() -> list[str]:
        return await env.store.dequeue(-1, [])

    assert await eventually(dequeued, timeout=5, what="the delayed run") == [delayed]
    assert time.monotonic() - began >= 1.0


async def test_a_queued_run_held_by_a_limit_can_be_canceled(env: Env) -> None:
    limits = [limit("team", 1, "data")]
    running = await queue(env, {"team": "data"})
    held = await queue(env, {"team": "data"})
    assert await env.store.dequeue(-1, limits) == [running]
    await commands.cancel(env.store, held)
    assert await env.status(held) == "CANCELED"
    await finish(env, running)
    assert await env.store.dequeue(-1, limits) == []


async def test_two_launcher_replicas_never_exceed_a_tag_limit_of_2_and_a_global_limit_of_3(env: Env) -> None:
    env.configure(
        run_coordinator={
            "max_concurrent_runs": 3,
            "tag_concurrency_limits": [{"key": "team", "value": "data", "limit": 2}],
        },
        run_monitoring={"heartbeat_interval_seconds": 0.5},
    )
    await env.start({"launcher": 2, "heartbeat": 1, "monitor": 1})
    step = [{"key": "work", "command": ["sleep", "0.6"]}]
    run_ids = [await env.submit(step, tags={"team": "data"} if i % 3 else {"team": "ml"}) for i in range(10)]
    samples: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            [row] = await env.store.fetch(
                f"SELECT count(*) AS total, count(*) FILTER (WHERE tags->>'team' = 'data') AS data "
                f"FROM runs WHERE status IN {IN_FLIGHT}"
            )
            samples.append((row["total"], row["data"]))
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    try:
        for run_id in run_ids:
            await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=60)
    finally:
        done.set()
        await sampler
    statuses = [await env.status(r) for r in run_ids]
    assert statuses == ["SUCCESS"] * 10
    assert max(t for t, _ in samples) == 3 and max(d for _, d in samples) == 2, samples  # reached, never more
    print(f"samples={len(samples)} max_total={max(t for t, _ in samples)} max_data={max(d for _, d in samples)}")


async def test_priority_order_end_to_end(env: Env) -> None:
    env.configure(run_coordinator={"max_concurrent_runs": 1})
    ids = {}
    for name, prio in [("p0", 0), ("p3", 3), ("p0b", 0), ("p9", 9), ("pm1", -1)]:
        ids[await queue(env, {"runherd/priority": prio})] = name
    await env.start()
    for run_id in ids:
        await env.wait_status(run_id, "SUCCESS", timeout=30)
    rows = await env.store.fetch(
        "SELECT run_id FROM events WHERE type = 'RUN_STATUS' AND data->>'to' = 'STARTING' ORDER BY id"
    )
    assert [ids[str(r["run_id"])] for r in rows] == ["p9", "p3", "p0", "p0b", "pm1"]


def test_limits_of_matches_config_shape() -> None:
    from runherd.config import from_mapping

    cfg = from_mapping(
        {
            "run_coordinator": {
                "tag_concurrency_limits": [{"key": "database", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
            }
        }
    )
    assert cfg.run_coordinator.tag_concurrency_limits == (TagConcurrencyLimit("database", 1, None, True),)
    assert limits_of(cfg) == [limit("database", 1, per_unique=True)]


async def test_runs_status_queued_says_why_each_waits(env: Env) -> None:
    cfg = {
        "database_url": env.db_url,
        "amqp_url": env.amqp_url,
        "run_coordinator": {
            "max_concurrent_runs": 3,
            "tag_concurrency_limits": [
                {"key": "team", "value": "data", "limit": 1},
                {"key": "database", "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
            ],
        },
    }
    path = env.tmp / "runherd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from runherd.config import load

    limits = limits_of(load(path, environ={}))
    running = [await queue(env, {"team": "data"}), await queue(env, {"database": "a"})]
    assert set(await env.store.dequeue(3, limits)) == set(running)
    team = await queue(env, {"team": "data"})
    db = await queue(env, {"database": "a"})
    nxt = await queue(env, {"database": "b"})
    after = await queue(env)
    backoff = await queue(env, delay=600)
    code, out, err = await cli("--config", str(path), "runs", "--status", "QUEUED", "--json")
    assert code == 0, err
    why = {r["run_id"]: r["waiting_for"] for r in orjson.loads(out)}
    assert why[team] == "tag limit team=data: 1/1 in flight"
    assert why[db] == "tag limit database=a: 1/1 in flight"
    assert why[nxt] == "next in line: fits every limit"
    assert why[after] == "max_concurrent_runs: 3/3 in flight"  # `nxt` takes the last slot
    assert why[backoff].startswith("retry backoff: not before")
    code, table, _ = await cli("--config", str(path), "runs", "--status", "QUEUED")
    assert code == 0 and "WAITING FOR" in table and "tag limit team=data: 1/1 in flight" in table


def random_tags(rnd: random.Random) -> dict[str, Any]:
    """Tags over the keys the random limits use: absent keys, a JSON null, a number and its text."""
    tags: dict[str, Any] = {"runherd/priority": rnd.choice([-1, 0, 0, 1, 3])}
    for key, values in (
        ("team", ["data", "ml"]),
        ("pool", ["x", "y"]),
        ("database", ["a", "b", "c", None]),
        ("shard", [1, "1", 2]),
    ):
        if rnd.random() < 0.6:
            tags[key] = rnd.choice(values)
    return tags


async def insert_runs(env: Env, rnd: random.Random, statuses: list[str]) -> None:
    """Runs straight into the table, as the launcher stores them (priority from the tag), with
    created_at ties (then run_id orders them) and some retries still in their backoff."""
    base = datetime.now(UTC) - timedelta(hours=1)
    tags = [random_tags(rnd) for _ in statuses]
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, priority, tags, steps, root_run_id, created_at, not_before) "
        "SELECT u.id, 'queue-test', u.status, 0, u.priority, u.tags::jsonb, '[]'::jsonb, u.id, u.created, u.nb "
        "FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::text[], $5::timestamptz[], $6::timestamptz[]) "
        "AS u(id, status, priority, tags, created, nb)",
        [uuid.uuid4() for _ in statuses],
        statuses,
        [t["runherd/priority"] for t in tags],
        [orjson.dumps(t).decode() for t in tags],
        [base + timedelta(seconds=rnd.randrange(len(statuses) // 2 + 1)) for _ in statuses],
        [base + timedelta(hours=rnd.choice([-1, 2])) if rnd.random() < 0.1 else None for _ in statuses],
    )


async def snapshot(env: Env) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    queued = await env.store.fetch(
        "SELECT run_id::text, tags, priority, created_at, not_before FROM runs WHERE status = 'QUEUED'"
    )
    in_flight = await env.store.fetch(f"SELECT tags FROM runs WHERE status IN {IN_FLIGHT}")
    return [dict(r) for r in queued], [dict(r) for r in in_flight]


async def finish_some(env: Env, rnd: random.Random, share: float) -> None:
    rows = await env.store.fetch(f"SELECT run_id FROM runs WHERE status IN {IN_FLIGHT}")
    done = [r["run_id"] for r in rows if rnd.random() < share]
    await env.store.fetch("UPDATE runs SET status = 'SUCCESS' WHERE run_id = ANY($1::uuid[])", done)


async def test_the_dequeue_statement_takes_exactly_what_the_pure_decision_picks(env: Env) -> None:
    """queries.sql `dequeue` against rules/coordinator.py `pick` on random queues: random limits
    (by key, by key and value, per unique value, of 0), a JSON null and numeric tag values, equal
    created_at, retries in their backoff, runs already in flight over a limit; round after round,
    the statement returns the very runs, in the very order, and Store.dequeue moves them."""
    for seed in range(4):
        rnd = random.Random(seed)
        await env.store.pool.execute("TRUNCATE runs CASCADE")
        limits = rnd.sample(
            [
                limit("team", rnd.randrange(4), "data"),
                limit("pool", rnd.randrange(1, 5)),
                limit("database", rnd.randrange(3), per_unique=True),
                limit("shard", 1, per_unique=True),
            ],
            rnd.randrange(1, 5),
        )
        coordinator = RunCoordinator(
            max_concurrent_runs=rnd.choice([-1, 25, 40]),
            tag_concurrency_limits=tuple(
                TagConcurrencyLimit(lim["key"], lim["limit"], lim["value"], lim["per_unique_value"]) for lim in limits
            ),
        )
        await insert_runs(env, rnd, ["QUEUED"] * 150 + ["STARTED"] * 12 + ["STARTING"] * 4 + ["SUCCESS"] * 20)
        for _ in range(6):
            queued, in_flight = await snapshot(env)
            batch = rnd.randrange(1, 40)
            expected = pick(queued, in_flight, coordinator, batch)
            rows = await env.store.fetch(dequeue_query(limits), coordinator.max_concurrent_runs, limits, batch)
            assert [str(r["run_id"]) for r in rows] == expected, (seed, limits)
            assert set(await env.store.dequeue(coordinator.max_concurrent_runs, limits, batch)) == set(expected)
            await finish_some(env, rnd, 0.4)


async def test_two_concurrent_dequeuers_never_exceed_a_limit(env: Env) -> None:
    """Two Store.dequeue calls at once, round after round, on two connections (as two launcher
    replicas): after every round no limit is exceeded, and every run is dequeued in the end."""
    rnd = random.Random(12)
    limits = [limit("team", 3, "data"), limit("database", 1, per_unique=True), limit("pool", 2)]
    coordinator = RunCoordinator(
        max_concurrent_runs=8,
        tag_concurrency_limits=tuple(
            TagConcurrencyLimit(lim["key"], lim["limit"], lim["value"], lim["per_unique_value"]) for lim in limits
        ),
    )
    await insert_runs(env, rnd, ["QUEUED"] * 120)
    await env.store.pool.execute("UPDATE runs SET not_before = NULL")
    both = 0
    for _ in range(400):
        moved = await asyncio.gather(
            env.store.dequeue(8, limits, batch=rnd.randrange(1, 6)), env.store.dequeue(8, limits, batch=5)
        )
        both += all(moved)
        _, in_flight = await snapshot(env)
        assert len(in_flight) <= 8
        for lim in coordinator.tag_concurrency_limits:
            counts: dict[str, int] = {}
            for run in in_flight:
                g = group(lim, run["tags"])
                if g is not None:
                    counts[g] = counts.get(g, 0) + 1
            assert max(counts.values(), default=0) <= lim.limit, (lim, counts)
        if not await env.store.fetch("SELECT 1 FROM runs WHERE status = 'QUEUED' LIMIT 1"):
            break
        await finish_some(env, rnd, 0.5)
    assert not await env.store.fetch("SELECT 1 FROM runs WHERE status = 'QUEUED'")
    print(f"rounds where both dequeuers moved runs: {both}")
