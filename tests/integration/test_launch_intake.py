"""Launch intake in batches (issue 12): consecutive launches are stored in one transaction, and each
message keeps its own verdict: a bad launch is dead-lettered with its reason, the same run id twice
(in one batch, or a redelivery) makes one run, and a command after a launch of the same run, in the
same batch, sees that run."""

from __future__ import annotations

import uuid

import aio_pika
import orjson

from runherd.broker import COMMANDS, ERROR_HEADER
from runherd.contract import run_id_from_message_id
from tests.harness import Env, eventually

STEP = {"key": "a", "command": ["true"]}


def launch(run_id: str | None, job: str = "intake") -> bytes:
    body: dict[str, object] = {"v": 1, "job": job, "steps": [STEP]}
    if run_id is not None:
        body["run_id"] = run_id
    return orjson.dumps(body)


async def test_one_batch_of_mixed_commands_keeps_each_message_verdict(env: Env) -> None:
    # Nothing is dequeued (no slot): what is checked is what the intake stored.
    env.configure(run_coordinator={"max_concurrent_runs": 0})
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    derived_id = f"msg-{uuid.uuid4().hex}"
    # Published before the launcher consumes, so that they arrive as one batch.
    await env.broker.publish_command("launch", launch(a))
    await env.broker.publish_command("launch", orjson.dumps({"v": 1, "steps": [STEP]}))  # no job
    await env.broker.publish_command("launch", launch(a, job="second-of-a"))  # the same run id again
    await env.broker.publish_command("launch", launch(b))
    await env.broker.publish_command("terminate", orjson.dumps({"v": 1, "run_id": b}))
    for _ in range(2):  # a redelivery of a launch without a run id: the id comes from the message id
        await env.broker.publish(COMMANDS, "launch", launch(None), message_id=derived_id)
    await env.broker.publish_command("launch", b"{not json")
    await env.start({"launcher": 1})

    c = run_id_from_message_id("launch", derived_id)
    await env.wait_status(b, "CANCELED")
    await env.wait_status(c, "QUEUED")
    run_a = await env.wait_status(a, "QUEUED")
    assert run_a["job"] == "intake"  # the first launch of a run id wins
    rows = await env.store.fetch("SELECT run_id::text AS run_id FROM runs")
    assert sorted(r["run_id"] for r in rows) == sorted([a, b, c])
    queued = await env.store.fetch("SELECT run_id::text AS run_id FROM events WHERE message = 'queued'")
    assert sorted(r["run_id"] for r in queued) == sorted([a, b, c])

    connection = await aio_pika.connect(env.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue("runherd.dead-letters")
        dead: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def two() -> bool:
            message = await queue.get(fail=False, no_ack=True)
            if message is not None:
                dead.append(message)
            return len(dead) >= 2

        await eventually(two, 15, what="the two bad launches dead-lettered")
    finally:
        await connection.close()
    reasons = sorted(str(m.headers[ERROR_HEADER]) for m in dead)
    assert "not valid JSON" in reasons[0] and "job: missing" in reasons[1], reasons
