"""Issue 2: bad launch messages are dead-lettered with their reason; nothing is written; the
service keeps consuming. Duplicates change nothing."""

from __future__ import annotations

import uuid

import aio_pika
import orjson
import pytest

from runherd.auth import TOKEN_HEADER
from runherd.broker import ERROR_HEADER
from runherd.contract import Event, EventType, now_iso
from tests.harness import Env, eventually

STEP = {"key": "a", "command": ["true"]}

BAD = [
    ("not json", b"{not json", "not valid JSON"),
    ("not an object", b"[1, 2, 3]", "must be a JSON object"),
    ("missing job", orjson.dumps({"v": 1, "steps": [STEP]}), "job: missing"),
    ("duplicate step keys", orjson.dumps({"v": 1, "job": "j", "steps": [STEP, STEP]}), "duplicate step key 'a'"),
    (
        "unknown dep",
        orjson.dumps({"v": 1, "job": "j", "steps": [{**STEP, "deps": ["nope"]}]}),
        "depends on unknown step 'nope'",
    ),
    (
        "cycle",
        orjson.dumps(
            {
                "v": 1,
                "job": "j",
                "steps": [
                    {"key": "a", "command": ["true"], "deps": ["b"]},
                    {"key": "b", "command": ["true"], "deps": ["a"]},
                ],
            }
        ),
        "cycle",
    ),
    (
        "both command and call",
        orjson.dumps({"v": 1, "job": "j", "steps": [{"key": "a", "command": ["true"], "call": "m:f"}]}),
        "exactly one of command or call",
    ),
    (
        "neither command nor call",
        orjson.dumps({"v": 1, "job": "j", "steps": [{"key": "a"}]}),
        "exactly one of command or call",
    ),
    ("wrong type: steps", orjson.dumps({"v": 1, "job": "j", "steps": "a"}), "steps: expected a list"),
    ("wrong type: job", orjson.dumps({"v": 1, "job": 5, "steps": [STEP]}), "job: expected a job name"),
    (
        "wrong type: priority tag",
        orjson.dumps({"v": 1, "job": "j", "steps": [STEP], "tags": {"runherd/priority": "high"}}),
        "runherd/priority",
    ),
    ("wrong version", orjson.dumps({"v": 2, "job": "j", "steps": [STEP]}), "v: expected 1"),
    ("bad run_id", orjson.dumps({"v": 1, "run_id": "x", "job": "j", "steps": [STEP]}), "run_id: expected a UUID"),
    ("unknown step field", orjson.dumps({"v": 1, "job": "j", "steps": [{**STEP, "retries": 3}]}), "retries"),
]


async def _dead_letters(amqp_url: str, count: int, timeout: float = 15) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect_robust(amqp_url)
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("runherd.dead-letters")

        async def enough() -> bool:
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
                got.append(message)
            return len(got) >= count

        await eventually(enough, timeout, what=f"{count} dead letters")
    return got


async def test_each_kind_of_bad_launch_is_dead_lettered_with_its_reason(env: Env) -> None:
    await env.start({"launcher": 1})
    for _, body, _ in BAD:
        await env.broker.publish("runherd.commands", "launch", body)
    dead = await _dead_letters(env.amqp_url, len(BAD))
    reasons = {m.body: m.headers[ERROR_HEADER] for m in dead}
    for name, body, expected in BAD:
        assert expected in reasons[body], (name, reasons[body])
    assert (await env.store.fetch("SELECT count(*) AS n FROM runs"))[0]["n"] == 0
    # ... and the launcher still consumes.
    run_id = await env.submit([STEP])
    await env.wait_status(run_id, "QUEUED", "STARTING", "STARTED", "SUCCESS")


async def test_a_launch_naming_a_launcher_not_configured_here_is_dead_lettered(env: Env) -> None:
    await env.start({"launcher": 1})
    await env.broker.publish(
        "runherd.commands", "launch", orjson.dumps({"v": 1, "job": "j", "steps": [STEP], "launcher": "kubernetes"})
    )
    [dead] = await _dead_letters(env.amqp_url, 1)
    assert "'kubernetes' is not configured here" in dead.headers[ERROR_HEADER]
    run_id = await env.submit([STEP])  # naming no launcher, or this one, is fine
    await env.broker.publish(
        "runherd.commands", "launch", orjson.dumps({"v": 1, "job": "j", "steps": [STEP], "launcher": "process"})
    )
    await env.wait_status(run_id, "QUEUED", "STARTING", "STARTED", "SUCCESS")

    async def two_runs() -> bool:
        return (await env.store.fetch("SELECT count(*) AS n FROM runs"))[0]["n"] == 2

    await eventually(two_runs, what="both valid launches queued")


@pytest.mark.parametrize("command", ["terminate", "reexecute"])
async def test_commands_for_unknown_runs_are_dead_lettered(env: Env, command: str) -> None:
    await env.start({"launcher": 1})
    body = orjson.dumps({"v": 1, "run_id": str(uuid.uuid4())})
    await env.broker.publish("runherd.commands", command, body)
    [dead] = await _dead_letters(env.amqp_url, 1)
    assert "no run" in dead.headers[ERROR_HEADER]


async def test_bad_events_and_heartbeats_are_dead_lettered_and_services_survive(env: Env) -> None:
    await env.start()
    await env.broker.publish("runherd.events", "run.x", b"garbage")
    stranger = str(uuid.uuid4())
    await env.broker.publish(
        "runherd.events",
        f"run.{uuid.uuid4()}",
        Event(run_id=stranger, attempt=1, seq=1, type=EventType.RUN_START, ts=now_iso()).body(),
        headers={TOKEN_HEADER: await env.token(stranger, 1)},
    )
    await env.broker.publish("runherd.heartbeats", "hb", b'{"v": 1, "run_id": "nope", "attempt": 1}', persistent=False)
    dead = await _dead_letters(env.amqp_url, 3)
    reasons = sorted(m.headers[ERROR_HEADER] for m in dead)
    assert any("not valid JSON" in r for r in reasons)
    assert any("unknown run" in r for r in reasons)
    assert any("run_id: expected a UUID" in r for r in reasons)
    run_id = await env.submit([STEP])
    await env.wait_status(run_id, "SUCCESS")


async def test_same_run_id_twice_makes_one_run(env: Env) -> None:
    await env.start()
    run_id = str(uuid.uuid4())
    await env.submit([STEP], run_id=run_id)
    await env.submit([{"key": "other", "command": ["false"]}], run_id=run_id)
    await env.wait_status(run_id, "SUCCESS")
    # Both commands consumed: the queue is empty and still one run, with its first plan.
    await eventually(lambda: _queue_empty(env, "runherd.launcher.commands"), what="commands consumed")
    rows = await env.store.fetch("SELECT steps FROM runs")
    assert len(rows) == 1 and rows[0]["steps"][0]["key"] == "a"


async def _queue_empty(env: Env, name: str) -> bool:
    return (await env.broker.queue_depths()).get(name, 1) == 0


async def test_redelivered_event_adds_no_row(env: Env) -> None:
    await env.start()
    run_id = await env.submit([STEP])
    await env.wait_status(run_id, "SUCCESS")

    async def exited() -> list[dict[str, object]] | None:
        events = await env.events(run_id)
        return events if any(e["type"] == "WORKER_EXITED" for e in events) else None

    before = await eventually(exited, what="the worker's exit in the log")
    step_success = next(e for e in before if e["type"] == "STEP_SUCCESS")
    replay = Event(
        run_id=run_id,
        attempt=step_success["attempt"],
        seq=step_success["seq"],
        source=step_success["source"],  # the same worker (worker:<id>) replayed
        type=EventType.STEP_SUCCESS,
        step_key="a",
        data={"output": None},
        ts=now_iso(),
    )
    for _ in range(3):
        await env.broker.publish_event(run_id, replay.body(), token=await env.token(run_id, replay.attempt))
    # A barrier: events are applied in order, and this one is dead-lettered after its batch commits.
    marker = Event(run_id=str(uuid.uuid4()), attempt=1, seq=1, type=EventType.RUN_START, ts=now_iso())
    await env.broker.publish_event(marker.run_id, marker.body(), token=await env.token(marker.run_id, 1))
    [dead] = await _dead_letters(env.amqp_url, 1)
    assert marker.run_id in dead.headers[ERROR_HEADER]
    after = await env.events(run_id)
    assert len(after) == len(before)
    assert (await env.status(run_id)) == "SUCCESS"


async def test_poison_event_is_retried_then_dead_lettered_without_holding_back_others(env: Env) -> None:
    await env.start()
    first = await env.submit([STEP])
    await env.wait_status(first, "SUCCESS")
    # Valid by the contract, refused by PostgreSQL (a trigger; a NUL in text is refused by the contract
    # now): the database error is not transient.
    await env.store.fetch(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.step_key = 'poison' "
        "THEN RAISE EXCEPTION 'poison'; END IF; RETURN NEW; END $$"
    )
    await env.store.fetch("CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison()")
    poison = Event(run_id=first, attempt=1, seq=5000, type=EventType.STEP_START, step_key="poison", ts=now_iso())
    await env.broker.publish_event(first, poison.body(), token=await env.token(first, 1))
    second = await env.submit([STEP])
    await env.wait_status(second, "SUCCESS")
    [dead] = await _dead_letters(env.amqp_url, 1, timeout=30)
    assert "event could not be applied" in dead.headers[ERROR_HEADER]


async def test_a_burst_of_step_events_applied_together_keeps_every_step_right(env: Env) -> None:
    """Step events that arrive together are written by one statement: duplicates still add no row,
    outputs of any JSON shape are kept, and each step ends in its latest state with its start time."""
    from runherd.contract import RunStatus, parse_launch

    launch = parse_launch(
        {"v": 1, "job": "burst", "steps": [{"key": "s1", "command": ["true"]}, {"key": "s2", "command": ["true"]}]}
    )
    await env.store.insert_run(launch, max_runtime_seconds=None, priority=0)
    await env.store.dequeue(-1, [])
    async with env.store.tx() as tx:
        await tx.transition([launch.run_id], RunStatus.STARTED)
    run_id = launch.run_id
    burst = [
        Event(run_id=run_id, attempt=1, seq=1, type=EventType.STEP_START, step_key="s1", ts=now_iso()),
        Event(
            run_id=run_id,
            attempt=1,
            seq=2,
            type=EventType.STEP_SUCCESS,
            step_key="s1",
            data={"output": [1, 2]},
            ts=now_iso(),
        ),
        Event(run_id=run_id, attempt=1, seq=3, type=EventType.STEP_START, step_key="s2", ts=now_iso()),
        Event(
            run_id=run_id,
            attempt=1,
            seq=4,
            type=EventType.STEP_FAILURE,
            step_key="s2",
            message="exited with code 2",
            ts=now_iso(),
        ),
    ]
    for event in [*burst, burst[1]]:  # the success twice
        await env.broker.publish_event(run_id, event.body(), token=await env.token(run_id, 1))
    await env.start({"monitor": 1})  # the backlog arrives as one batch

    async def applied() -> dict[str, dict[str, object]] | None:
        steps = {s["step_key"]: s for s in (await env.run(run_id))["steps_status"]}  # type: ignore[index]
        return steps if len(steps) == 2 else None

    steps = await eventually(applied, what="both steps recorded")
    assert steps["s1"]["status"] == "SUCCESS" and steps["s1"]["output"] == [1, 2]
    assert steps["s1"]["started_at"] is not None and steps["s1"]["ended_at"] is not None
    assert steps["s2"]["status"] == "FAILURE" and steps["s2"]["error"] == "exited with code 2"
    assert steps["s2"]["started_at"] is not None and steps["s2"]["output"] is None
    step_events = [e for e in await env.events(run_id) if e["step_key"]]
    assert [(e["seq"], e["type"]) for e in step_events] == [
        (1, "STEP_START"),
        (2, "STEP_SUCCESS"),
        (3, "STEP_START"),
        (4, "STEP_FAILURE"),
    ]
