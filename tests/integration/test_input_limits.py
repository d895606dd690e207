"""Input limits at the door (issue 9, item 7), on the real broker: a launch over each limit, and a
body over the size limit at each of the three consumers (launcher, monitor, heartbeat), is
dead-lettered with a reason naming the limit; nothing is stored; the services go on consuming."""

from __future__ import annotations

import uuid

import orjson

from runherd.broker import BODY_BYTES_HEADER, ERROR_HEADER, OVERSIZED_HEAD_BYTES
from runherd.limits import DEFAULT
from tests.harness import Env
from tests.integration.test_bad_input import _dead_letters

STEP = {"key": "hello", "command": ["true"]}


def _launch(**fields: object) -> bytes:
    return orjson.dumps({"v": 1, "job": "limits", "steps": [STEP], **fields})


def _oversized(kind: str) -> bytes:
    """Valid JSON of the given kind, one byte over the default limit."""
    head = orjson.dumps({"v": 1, "kind": kind, "padding": ""})[:-2]
    return head + b"x" * (DEFAULT.max_message_bytes + 1 - len(head) - 2) + b'"}'


async def test_each_limit_is_refused_at_the_door_with_its_reason(env: Env) -> None:
    await env.start({"launcher": 1, "heartbeat": 1, "monitor": 1})
    too_many = [{"key": f"s{i}", "command": ["true"]} for i in range(DEFAULT.max_steps + 1)]
    long_key = "k" * (DEFAULT.max_tag_key_length + 1)
    long_value = "v" * (DEFAULT.max_tag_value_length + 1)
    big_env = {"BIG": "e" * DEFAULT.max_env_bytes}
    origin = str(uuid.uuid4())
    refused = {
        _launch(steps=too_many): f"steps: {DEFAULT.max_steps + 1} steps, over the limit of {DEFAULT.max_steps}",
        _launch(tags={long_key: "x"}): f"key of {DEFAULT.max_tag_key_length + 1} characters, over the limit",
        _launch(tags={"team": long_value}): f"value of {DEFAULT.max_tag_value_length + 1} characters, over the limit",
        _launch(tags={"n": [long_value]}): "(limits.max_tag_value_length)",
        _launch(env=big_env): f"env: {DEFAULT.max_env_bytes + 4} bytes, over the limit of {DEFAULT.max_env_bytes}",
        orjson.dumps({"v": 1, "run_id": origin, "tags": {long_key: 1}}): "(limits.max_tag_key_length)",
    }
    for body, _ in list(refused.items())[:-1]:
        await env.broker.publish("runherd.commands", "launch", body)
    await env.broker.publish("runherd.commands", "reexecute", list(refused)[-1])
    sizes = {
        ("runherd.commands", "launch"): _oversized("launch"),
        ("runherd.events", f"run.{uuid.uuid4()}"): _oversized("event"),
        ("runherd.heartbeats", "hb"): _oversized("heartbeat"),
    }
    for (exchange, key), body in sizes.items():
        await env.broker.publish(exchange, key, body)

    dead = await _dead_letters(env.amqp_url, len(refused) + len(sizes), timeout=30)
    reasons = {m.body: str(m.headers[ERROR_HEADER]) for m in dead if BODY_BYTES_HEADER not in m.headers}
    for body, expected in refused.items():
        assert expected in reasons[body], (expected, reasons[body])
    big = {m.headers["x-runherd-exchange"]: m for m in dead if BODY_BYTES_HEADER in m.headers}
    assert set(big) == {exchange for exchange, _ in sizes}
    for (exchange, _), body in sizes.items():
        message = big[exchange]
        assert str(message.headers[ERROR_HEADER]) == (
            f"message too large: {len(body)} bytes, over the limit of {DEFAULT.max_message_bytes} bytes "
            "(limits.max_message_bytes); refused before parsing"
        )
        # The dead letter keeps the head of the body, not all of it.
        assert message.headers[BODY_BYTES_HEADER] == len(body)
        assert message.body == body[:OVERSIZED_HEAD_BYTES]
    assert (await env.store.fetch("SELECT count(*) AS n FROM runs"))[0]["n"] == 0

    # A launch within the limits still goes through the same door.
    run_id = await env.submit([STEP], tags={"team": "v" * DEFAULT.max_tag_value_length})
    assert (await env.wait_status(run_id, "SUCCESS"))["status"] == "SUCCESS"
