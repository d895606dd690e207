"""Issue 8, item 2: a heartbeat outage is not a fleet of hung workers.

The hang rule (`silent_workers`) measures a worker's silence up to where the heartbeat pipeline is
heard (`runherd_heard_through()`), not up to now. Tested first as the single SQL statement it is, on
rows written by hand, then end to end: the heartbeat service runs as its own OS process and is
SIGSTOPped for twice the heartbeat timeout under live runs."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

import pytest

from runherd.heartbeat.watermark import CANARY_RUN_ID
from runherd.rules.sweeps import SHORTEST_SLEEP, due_rules, is_deaf, sleep_seconds
from tests.harness import Env, eventually

TIMEOUT = 4.0  # heartbeat_timeout_seconds of the fast config
GRACE = 10.0  # start grace of an attempt never heard


# --- the decision, one SQL statement ---------------------------------------------------------------


async def _run(env: Env, *, last_seen: float | None, launched: float = 60.0) -> uuid.UUID:
    """A STARTED run whose attempt was last heard ``last_seen`` seconds ago (None: never), launched
    ``launched`` seconds ago; both in the database's clock."""
    run_id = uuid.uuid4()
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, steps, root_run_id, started_at) "
        "VALUES ($1, 'j', 'STARTED', 1, '[]', $1, now())",
        run_id,
    )
    await env.store.pool.execute(
        "INSERT INTO attempts (run_id, attempt, launched_at, last_heartbeat_at) "
        "VALUES ($1, 1, now() - make_interval(secs => $2), now() - make_interval(secs => $3))",
        run_id,
        launched,
        last_seen,
    )
    return run_id


async def _replica(env: Env, heard_ago: float | None, seen_ago: float = 0.0) -> None:
    """A heartbeat replica heard through ``heard_ago`` seconds ago (None: nothing heard yet)."""
    await env.store.pool.execute(
        "INSERT INTO heartbeat_replicas (replica, heard_through, seen_at) VALUES ($1, "
        "coalesce(now() - make_interval(secs => $2), '-infinity'), now() - make_interval(secs => $3))",
        f"r-{uuid.uuid4().hex[:8]}",
        heard_ago,
        seen_ago,
    )


async def _silent(env: Env) -> set[uuid.UUID]:
    async with env.store.tx() as tx:
        rows = await tx.violators("silent_workers", TIMEOUT, 100, GRACE)
    return {r["run_id"] for r in rows}


async def _events(env: Env, applied_ago: float | None) -> None:
    """Every event published more than ``applied_ago`` seconds ago is applied (None: unknown)."""
    await env.store.pool.execute(
        "UPDATE event_watermark SET applied_through = now() - make_interval(secs => $1)", applied_ago
    )


Replicas = list[tuple[float | None, float]]
# (replicas as (heard seconds ago, seen seconds ago), events applied seconds ago, worker last heard
# seconds ago, flagged?)
CASES: list[tuple[str, Replicas, float | None, float | None, bool]] = [
    ("pipeline heard: a worker silent 10 s is hung", [(0.5, 0)], 0.5, 10, True),
    ("pipeline heard: a worker heard 2 s ago is alive", [(0.5, 0)], 0.5, 2, False),
    ("pipeline stalled 8 s: a worker silent 10 s was silent 2 s of it", [(8, 8)], 0.5, 10, False),
    ("no heartbeat replica at all: nothing can be heard", [], 0.5, 3600, False),
    ("a new replica has heard nothing yet", [(0.5, 0), (None, 0)], 0.5, 3600, False),
    ("one of two replicas stalled holds the rule", [(0.5, 0), (9, 9)], 0.5, 10, False),
    ("a replica gone past the 180 s lease no longer counts", [(0.5, 0), (300, 200)], 0.5, 10, True),
    ("event backlog of 8 s: its RUN_SUCCESS may be queued", [(0.5, 0)], 8, 10, False),
    ("no event canary applied yet", [(0.5, 0)], None, 3600, False),
    ("never heard, launched 60 s ago, pipeline heard", [(0.5, 0)], 0.5, None, True),
    ("never heard, launched 60 s ago, pipeline stalled for 55 s", [(55, 55)], 0.5, None, False),
]


@pytest.mark.parametrize(
    ("replicas", "events", "last_seen", "flagged"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_silent_workers_measures_silence_up_to_where_the_workers_are_heard(
    env: Env, replicas: Replicas, events: float | None, last_seen: float | None, flagged: bool
) -> None:
    for heard_ago, seen_ago in replicas:
        await _replica(env, heard_ago, seen_ago)
    await _events(env, events)
    run_id = await _run(env, last_seen=last_seen)
    assert (run_id in await _silent(env)) is flagged


@pytest.mark.parametrize("exited", [False, True], ids=["worker live", "worker exited, run not moved on"])
@pytest.mark.parametrize(
    ("replicas", "events", "last_seen", "flagged"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_the_heartbeat_deadline_is_due_exactly_when_silent_workers_finds_the_run(
    env: Env, replicas: Replicas, events: float | None, last_seen: float | None, flagged: bool, exited: bool
) -> None:
    """A sweep runs the heartbeat rule only when rule_deadlines says it is due, so the two must agree,
    also for a STARTED run whose current attempt has exited (read by the statement's other path)."""
    for heard_ago, seen_ago in replicas:
        await _replica(env, heard_ago, seen_ago)
    await _events(env, events)
    await _run(env, last_seen=1)  # a live, healthy neighbour
    run_id = await _run(env, last_seen=last_seen)
    if exited:
        await env.store.pool.execute("UPDATE attempts SET exited_at = now() WHERE run_id = $1", run_id)
    deadlines = await env.store.rule_deadlines(TIMEOUT, GRACE, 600, 600, 0)
    assert ("heartbeat_timeout" in due_rules(deadlines)) is flagged, deadlines
    assert (run_id in await _silent(env)) is flagged


async def test_rule_deadlines_set_no_heartbeat_wakeup_while_the_pipeline_is_stale(env: Env) -> None:
    """Else the sweep loop would wake every 50 ms for a rule that is held."""
    await _run(env, last_seen=10)
    await _replica(env, heard_ago=9, seen_ago=9)
    await _events(env, 0.5)
    stale = await env.store.rule_deadlines(TIMEOUT, GRACE, 600, 600, 0)
    assert is_deaf(stale, TIMEOUT) and due_rules(stale) == []
    assert sleep_seconds(stale, 0.0, TIMEOUT, 99.0) == 99.0
    await env.store.pool.execute("UPDATE heartbeat_replicas SET heard_through = now() - interval '1 second'")
    heard = await env.store.rule_deadlines(TIMEOUT, GRACE, 600, 600, 0)
    assert heard.heartbeat_timeout is not None and heard.heartbeat_timeout < 0
    assert due_rules(heard) == ["heartbeat_timeout"]
    assert sleep_seconds(heard, 0.0, TIMEOUT, 99.0) == SHORTEST_SLEEP


async def _event_canary(env: Env) -> int:
    assert await env.store.issue_event_canary(7) is not None
    return 7


async def test_an_event_canary_applied_advances_the_event_watermark_to_its_stamp(env: Env) -> None:
    assert await _events_applied(env) is False
    stamp = await env.store.issue_event_canary(5)
    await env.store.record_event_canaries([6])  # never issued: nothing moves
    assert await _events_applied(env) is False
    await env.store.record_event_canaries([5])
    rows = await env.store.fetch("SELECT applied_through FROM event_watermark")
    assert rows[0]["applied_through"] == stamp


async def test_a_heartbeat_is_stamped_with_the_database_clock_and_canaries_advance_the_watermark(env: Env) -> None:
    from datetime import UTC, datetime, timedelta

    run_id = await _run(env, last_seen=None)
    ahead = datetime.now(UTC) + timedelta(seconds=60)  # a worker clock 60 s ahead
    await env.store.record_heartbeats([(str(run_id), 1, ahead)], replica="r1")
    (row,) = await env.store.fetch(
        "SELECT extract(epoch FROM clock_timestamp() - last_heartbeat_at) AS age FROM attempts WHERE run_id = $1",
        run_id,
    )
    assert 0 <= row["age"] < 5
    await env.store.record_event_canaries([await _event_canary(env)])
    issued, _ = await env.store.issue_canaries("r1", [42])
    assert issued == [42]
    issued, replicas = await env.store.issue_canaries("r1", [42, 44])
    assert issued == [44], "a nonce is issued once"
    assert replicas == 1, "r1, registered by its first canary, is the one live replica"
    (row,) = await env.store.fetch("SELECT stamp FROM heartbeat_canaries WHERE nonce = 42")
    stamp = row["stamp"]
    assert await env.store.heard_lag() is None  # registered, nothing heard yet
    await env.store.record_heartbeats([(CANARY_RUN_ID, 7)], replica="r1")  # a nonce never issued
    assert await env.store.heard_lag() is None
    await env.store.record_heartbeats([(CANARY_RUN_ID, 42)], replica="r1")
    heard = await env.store.fetch("SELECT heard_through FROM heartbeat_replicas WHERE replica = 'r1'")
    assert heard[0]["heard_through"] == stamp
    assert (await env.store.issue_canaries("r1", [43]))[0] == [43]
    await env.store.forget_replica("r1")  # a replica that stopped cleanly, writing its last batch
    await env.store.record_heartbeats([(CANARY_RUN_ID, 43)], replica="r1")
    assert await env.store.fetch("SELECT * FROM heartbeat_replicas") == []
    assert await env.store.heard_lag() is None


# --- end to end: the heartbeat service paused under live runs --------------------------------------


async def _heard_now(env: Env) -> bool:
    lag = await env.store.heard_lag()
    return lag is not None and lag < 1.5


async def _all_heard(env: Env, run_ids: list[str], within: float) -> bool:
    rows = await env.store.fetch(
        "SELECT count(*) AS n FROM attempts a JOIN runs r ON r.run_id = a.run_id AND r.attempt = a.attempt "
        "WHERE a.run_id = ANY($1::uuid[]) AND a.last_heartbeat_at > clock_timestamp() - make_interval(secs => $2)",
        [uuid.UUID(r) for r in run_ids],
        within,
    )
    return rows[0]["n"] == len(run_ids)


async def _silent_for(env: Env) -> float:
    rows = await env.store.fetch(
        "SELECT extract(epoch FROM clock_timestamp() - max(last_heartbeat_at))::float8 AS s FROM attempts"
    )
    return float(rows[0]["s"] or 0)


async def _stalled(env: Env) -> float:
    """How long no heartbeat has been written, once that is twice the timeout (the monitor sweeps
    every 0.5 s meanwhile); 0 before."""
    silent = await _silent_for(env)
    return silent if silent > 2 * TIMEOUT else 0.0


async def _resumes(env: Env) -> list[dict[str, Any]]:
    return await env.store.fetch("SELECT run_id, message FROM events WHERE type = 'RUN_RESUMED'")


async def test_heartbeat_service_paused_twice_the_timeout_resumes_nothing_and_a_hung_worker_is_still_found(
    env: Env,
) -> None:
    done = env.tmp / "done"
    await env.start({"launcher": 1, "monitor": 1})
    heartbeat = env.spawn("heartbeat")
    step = ["sh", "-c", f'while [ ! -e "{done}" ]; do sleep 0.2; done']
    runs = [await env.submit([{"key": "wait", "command": step}]) for _ in range(10)]
    await eventually(lambda: _all_heard(env, runs, 2.0), timeout=60, what="10 live runs heard")
    await eventually(lambda: _heard_now(env), what="the heartbeat pipeline heard")

    os.kill(heartbeat.pid, signal.SIGSTOP)
    try:  # the workers keep heartbeating into the queue; nobody writes them for 2 x the timeout
        stalled = await eventually(lambda: _stalled(env), timeout=30, what="2 x the timeout without a heartbeat")
    finally:
        os.kill(heartbeat.pid, signal.SIGCONT)
    await eventually(lambda: _all_heard(env, runs, 2.0), timeout=20, what="the backlog written")
    await eventually(lambda: _heard_now(env), what="the pipeline heard again")
    assert await _resumes(env) == [], "a stalled heartbeat pipeline made live workers look hung"

    # A worker that really hangs, once the pipeline is healthy, is found within the timeout.
    hung = runs[0]
    handle = await env.handle(hung, attempt=1)
    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    os.killpg(handle["pid"], signal.SIGSTOP)
    await eventually(lambda: _resumes(env), timeout=30, what="the hung worker resumed")
    detected = loop.time() - stopped_at
    resumes = await _resumes(env)
    assert [str(r["run_id"]) for r in resumes] == [hung] and "no heartbeat" in resumes[0]["message"]
    assert TIMEOUT - 1 < detected < TIMEOUT + 6, detected
    print(
        f"\n10 live runs, heartbeat service stopped {stalled:.1f} s: 0 resumes; hung worker found in {detected:.1f} s"
    )

    done.touch()
    for run_id in runs:
        run = await env.wait_status(run_id, "SUCCESS", timeout=60)
        assert run["attempt"] == (2 if run_id == hung else 1)


async def _events_applied(env: Env) -> bool:
    rows = await env.store.fetch("SELECT applied_through IS NOT NULL AS ok FROM event_watermark")
    return bool(rows[0]["ok"])


async def _gone_for(env: Env, run_id: str, seconds: float) -> bool:
    """The attempt's worker exited and was last heard more than ``seconds`` ago."""
    rows = await env.store.fetch(
        "SELECT a.last_heartbeat_at < clock_timestamp() - make_interval(secs => $2) AS ok "
        "FROM attempts a WHERE a.run_id = $1 AND a.attempt = 1",
        uuid.UUID(run_id),
        seconds,
    )
    return bool(rows and rows[0]["ok"])


async def test_an_event_backlog_older_than_the_timeout_does_not_resume_a_run_whose_success_is_queued(
    env: Env,
) -> None:
    """The monitor that holds the events queue (single active consumer) is SIGSTOPped; the worker
    finishes (RUN_SUCCESS queued behind it) and falls silent; another monitor sweeps meanwhile."""
    ingest = env.spawn("monitor")  # first, so it is the events queue's active consumer
    await eventually(lambda: _events_applied(env), timeout=30, what="the spawned monitor applying events")
    await env.start({"launcher": 1, "heartbeat": 1, "monitor": 1})  # this monitor sweeps, its ingest stands by
    go = env.tmp / "go"
    run_id = await env.submit([{"key": "wait", "command": ["sh", "-c", f'while [ ! -e "{go}" ]; do sleep 0.2; done']}])
    await env.wait_status(run_id, "STARTED", timeout=60)
    await eventually(lambda: _all_heard(env, [run_id], 2.0), timeout=30, what="the worker heard")

    os.kill(ingest.pid, signal.SIGSTOP)
    try:
        go.touch()  # the run succeeds; its RUN_SUCCESS waits behind the stopped consumer
        await eventually(lambda: _gone_for(env, run_id, 2 * TIMEOUT), timeout=30, what="2 x the timeout of silence")
        assert await _resumes(env) == [], "a run whose RUN_SUCCESS was queued was resumed"
    finally:
        os.kill(ingest.pid, signal.SIGCONT)
    run = await env.wait_status(run_id, "SUCCESS", timeout=30)
    assert run["attempt"] == 1 and await _resumes(env) == []
