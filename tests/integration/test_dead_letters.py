"""A dead letter can be matched to what was sent: every AMQP property of the original is kept, and
runherd's own facts travel in documented ``x-runherd-*`` headers."""

from __future__ import annotations

from datetime import UTC, datetime

import aio_pika

from runherd.broker import ERROR_HEADER, EXCHANGE_HEADER, ROUTING_KEY_HEADER
from tests.harness import Env
from tests.integration.test_bad_input import _dead_letters


async def test_a_dead_letter_keeps_every_property_of_the_original(env: Env) -> None:
    await env.start({"launcher": 1})
    sent_at = datetime(2026, 11, 29, 6, 0, 0, tzinfo=UTC)
    connection = await aio_pika.connect(env.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("runherd.commands")
        await exchange.publish(
            aio_pika.Message(
                b"this is not json",
                content_type="text/plain",
                content_encoding="utf-8",
                message_id="node-client-42",
                correlation_id="corr-7",
                reply_to="my.replies",
                app_id="billing",
                type="launch-request",
                priority=3,
                timestamp=sent_at,
                headers={"tenant": "acme"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="launch",
        )
    [dead] = await _dead_letters(env.amqp_url, 1)
    assert dead.body == b"this is not json"
    assert (dead.content_type, dead.content_encoding) == ("text/plain", "utf-8")
    assert (dead.message_id, dead.correlation_id, dead.reply_to) == ("node-client-42", "corr-7", "my.replies")
    assert (dead.app_id, dead.type, dead.priority) == ("billing", "launch-request", 3)
    assert dead.timestamp is not None and dead.timestamp.replace(tzinfo=UTC) == sent_at
    assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert dead.headers["tenant"] == "acme"
    assert str(dead.headers[ERROR_HEADER]).startswith("body is not valid JSON")
    assert dead.headers[EXCHANGE_HEADER] == "runherd.commands"
    assert dead.headers[ROUTING_KEY_HEADER] == "launch"
