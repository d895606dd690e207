"""The database goes away under the services (a TCP proxy in front of PostgreSQL that drops every
connection and refuses new ones for longer than RabbitMQ's delivery limit used to last): no
launch, command or event is dead-lettered or lost, no delivery attempt is spent, no service exits."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from runherd import config
from runherd.broker import DEAD_QUEUE, EVENTS_QUEUE, Delivery
from runherd.consume import APPLIED, Reject, Retry, Verdict, consume, hold_delay
from runherd.contract import run_id_from_message_id
from runherd.store.store import TransientDbError
from tests.harness import Env, eventually
from tests.proxy import Proxy


class Outage(Proxy):
    """A proxy that can go dark: every connection dropped, new ones refused, until ``end``."""

    dark = False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.dark:
            writer.transport.abort()
            return
        await super()._handle(reader, writer)

    def begin(self) -> None:
        self.dark = True
        self.cut()

    def end(self) -> None:
        self.dark = False


async def _queue_depth(env: Env, queue: str) -> int:
    return (await env.broker.queue_depths()).get(queue, -1)


async def test_a_database_outage_dead_letters_nothing_and_spends_no_delivery(env: Env) -> None:
    proxy = await Outage("127.0.0.1", 5432).start()
    try:
        db_name = env.db_url.rsplit("/", 1)[1]
        raw = {
            **env.raw_config(),
            "database_url": f"postgresql://postgres@127.0.0.1:{proxy.port}/{db_name}",
            # Silence during the outage is the heartbeat rule's business (tested on its own):
            # here every run must simply come through.
            "run_monitoring": {**env.raw_config()["run_monitoring"], "heartbeat_timeout_seconds": 60},
        }
        running = await env.start(cfg=config.from_mapping(raw))
        gate = env.tmp / "gate"
        steps = [
            {"key": "one", "command": ["true"]},
            {"key": "two", "command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done"], "deps": ["one"]},
            {"key": "three", "command": ["true"], "deps": ["two"]},
        ]
        in_flight = [await env.submit(steps) for _ in range(5)]

        async def all_in_step_two() -> bool:
            for run_id in in_flight:
                if not any(e["type"] == "STEP_START" and e["step_key"] == "two" for e in await env.events(run_id)):
                    return False
            return True

        await eventually(all_in_step_two, timeout=40, what="every run in step two")
        proxy.begin()
        # During the outage: new launches, a cancel, and the workers' events (step two ends).
        launched_during = [await env.submit(steps[:1]) for _ in range(5)]
        gate.touch()
        loop = asyncio.get_running_loop()
        dark_until = loop.time() + 9  # longer than 5 deliveries x the old requeue loop
        while loop.time() < dark_until:
            assert running.supervisor.failure is None
            await asyncio.sleep(0.5)  # holding the outage open for a fixed time is the scenario itself
        proxy.end()

        for run_id in in_flight + launched_during:
            run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=60)
            assert run["status"] == "SUCCESS", run["reason"]
            assert run["attempt"] == 1, f"{run_id} was resumed: {run['reason']}"
        assert await _queue_depth(env, DEAD_QUEUE) == 0
        assert running.supervisor.failure is None
        assert not running.supervisor.stop.is_set(), "a service stopped because of the outage"
    finally:
        proxy.end()
        await proxy.close()


async def _publish(env: Env, n: int) -> None:
    for i in range(n):
        body = {
            "v": 1,
            "run_id": str(uuid.uuid4()),
            "attempt": 1,
            "source": "worker",
            "seq": i,
            "type": "ENGINE_EVENT",
            "ts": "2026-01-01T00:00:00+00:00",
        }
        await env.broker.publish_event(body["run_id"], orjson.dumps(body))


async def test_the_consume_loop_holds_an_unavailable_batch_without_redelivery(env: Env) -> None:
    """The verdict loop itself: while the handler says the database is unavailable the batch is
    held, never requeued (x-delivery-count stays 0); verdicts then settle each delivery."""
    await _publish(env, 3)
    seen: list[int] = []
    fails = 4
    stop = asyncio.Event()

    async def handler(batch: list[Delivery]) -> list[Verdict]:
        nonlocal fails
        seen.extend(d.deliveries for d in batch)
        if fails:
            fails -= 1
            raise ConnectionRefusedError("database down")
        stop.set()
        return [APPLIED, Reject("bad one"), Retry("flaky")][: len(batch)]

    task = asyncio.ensure_future(
        consume(env.broker, EVENTS_QUEUE, handler, stop=stop, max_size=3, max_wait=0.5, unavailable=TransientDbError)
    )
    await asyncio.wait_for(task, 30)
    assert seen[:3] == [1, 1, 1] and set(seen) == {1}, "a held delivery was redelivered"
    assert len(seen) == 3 * 5
    await eventually(lambda: _queue_depth(env, DEAD_QUEUE), what="the rejected one dead-lettered")
    await eventually(lambda: _depth_is(env, EVENTS_QUEUE, 1), what="the retried one back in its queue")


async def _depth_is(env: Env, queue: str, n: int) -> bool:
    return await _queue_depth(env, queue) == n


@pytest.mark.parametrize("tries", [1, 2, 5, 30])
def test_hold_backoff_grows_with_jitter_and_is_capped(tries: int) -> None:
    import random

    rng = random.Random(tries)
    delays = [hold_delay(tries, rng) for _ in range(50)]
    ceiling = min(5.0, 0.2 * 2 ** (tries - 1))
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1  # jittered


async def test_a_launch_without_run_id_redelivered_makes_one_run(env: Env) -> None:
    """The run id of a launch that has none is derived from its AMQP message_id."""
    await env.start({"launcher": 1})
    body = orjson.dumps({"v": 1, "job": "no-id", "steps": [{"key": "a", "command": ["true"]}]})
    for _ in range(3):  # as a redelivery after commit, before ack, would
        await env.broker.publish("runherd.commands", "launch", body, message_id="client-msg-1")
    # Commands are applied in order: once a later launch is in, the three before it were handled.
    marker = await env.submit([{"key": "a", "command": ["true"]}], job="marker")
    await eventually(lambda: env.run(marker), what="the marker launch applied")
    rows = await env.store.fetch("SELECT run_id FROM runs WHERE job = 'no-id'")
    assert len(rows) == 1
    assert str(rows[0]["run_id"]) == run_id_from_message_id("launch", "client-msg-1")


async def test_a_stuck_statement_times_out_as_a_transient_error(env: Env) -> None:
    """A statement stuck behind a lock fails after the pool's statement timeout (and is retried by
    its caller like any transient error) instead of holding the service."""
    import asyncpg

    from runherd.store import Store

    await env.start({"launcher": 1})
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await eventually(lambda: env.run(run_id), timeout=30, what="the run stored")
    store = await Store.connect(env.db_url, statement_timeout=1)
    blocker = await asyncpg.connect(env.db_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE", uuid.UUID(run_id))
            with pytest.raises(TransientDbError) as caught:
                async with store.tx() as tx:
                    await tx.lock_runs([run_id])
            assert isinstance(caught.value, asyncpg.exceptions.QueryCanceledError)
    finally:
        await blocker.close()
        await store.close()
