"""Issue 13 items 4 and 5: the Python client against real RabbitMQ, PostgreSQL and the in-process
services; a status stream that survives a cut connection; resumes visible to subscribers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable

import aio_pika
import orjson
import pytest

from runherd import config
from runherd.broker import ERROR_HEADER
from runherd.client import Client, Launch, RunResult, StatusChange, StatusStream, Step, status_bindings
from runherd.contract import RunStatus
from runherd.errors import InvalidMessage
from tests.harness import Env, eventually
from tests.private_rabbit import PrivateRabbit, available
from tests.proxy import Proxy

# A step that blocks forever on the first attempt only: a resumed attempt gets through.
HANG_ON_FIRST = ["sh", "-c", 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then sleep 600; fi']


@pytest.fixture
async def client(env: Env) -> AsyncIterator[Client]:
    async with await Client.connect(env.amqp_url, env.db_url) as c:
        yield c


class Collector:
    """Iterates a status stream in the background, keeping every change it yields."""

    def __init__(self, stream: StatusStream) -> None:
        self.stream = stream
        self.changes: list[StatusChange] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for change in self.stream:
            self.changes.append(change)

    def of(self, run_id: str) -> list[str]:
        return [c.status.value for c in self.changes if c.run_id == run_id]

    async def until(self, predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
        await eventually(lambda: self.task.done() or predicate(), timeout, what=what)
        if self.task.done():
            self.task.result()  # the stream ended: raise why

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_launch_and_wait_success(env: Env, client: Client) -> None:
    await env.start()
    run_id = await client.launch(
        "client-ok", [Step("one", command=["true"]), Step("two", command=["true"], deps=["one"])], tags={"team": "x"}
    )
    result = await client.wait(run_id, timeout=30)
    assert result == RunResult(run_id, RunStatus.SUCCESS, None, 1) and result.ok
    run = await env.run(run_id)
    assert run is not None and run["tags"] == {"team": "x"}
    # A finished run is read from the database: waiting again returns at once.
    assert await client.wait(run_id, timeout=5) == result


async def test_wait_without_a_database_follows_the_status_topic(env: Env) -> None:
    await env.start()
    async with await Client.connect(env.amqp_url) as client:
        launch = Launch("client-topic", [Step("a", command=["true"])], env={"K": "V"})
        waiter = asyncio.ensure_future(client.wait(launch.run_id, timeout=30))
        await asyncio.sleep(0.5)  # let the waiter subscribe: without a database it sees only later finishes
        assert await client.launch(launch) == launch.run_id
        result = await waiter
    assert result.status is RunStatus.SUCCESS and result.run_id == launch.run_id


async def test_a_failing_run_gives_its_reason(env: Env, client: Client) -> None:
    await env.start()
    run_id = await client.launch("client-fail", [Step("boom", command=["sh", "-c", "echo no such table >&2; exit 3"])])
    result = await client.wait(run_id, timeout=30)
    assert result.status is RunStatus.FAILURE and not result.ok
    assert result.reason is not None and "boom" in result.reason and "exited with code 3" in result.reason


async def test_wait_times_out_with_a_sentence(env: Env, client: Client) -> None:
    await env.start()
    run_id = await client.launch("client-slow", [Step("a", command=["sleep", "600"])])
    with pytest.raises(TimeoutError, match=f"run {run_id} did not finish within 1 s"):
        await client.wait(run_id, timeout=1)
    await client.cancel(run_id)
    assert (await client.wait(run_id, timeout=30)).status is RunStatus.CANCELED


async def test_cancel_a_started_run(env: Env, client: Client) -> None:
    await env.start()
    async with client.statuses(job="client-cancel", status="STARTED") as started:
        run_id = await client.launch("client-cancel", [Step("a", command=["sleep", "600"])])
        change = await asyncio.wait_for(anext(started), 30)
    assert change.run_id == run_id and change.previous_status is RunStatus.STARTING
    await client.cancel(run_id)
    result = await client.wait(run_id, timeout=30)
    assert result.status is RunStatus.CANCELED


async def test_reexecute_from_failure_reuses_completed_steps(env: Env, client: Client) -> None:
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    steps = [
        Step("one", command=["sh", "-c", f"echo one >> {effects}"]),
        Step("two", command=["test", "-e", str(gate)], deps=["one"]),
    ]
    origin = await client.launch("client-reexec", steps)
    assert (await client.wait(origin, timeout=30)).status is RunStatus.FAILURE
    gate.touch()
    new = await client.reexecute(origin, strategy="FROM_FAILURE", tags={"why": "gate fixed"})
    assert new != origin
    assert (await client.wait(new, timeout=30)).status is RunStatus.SUCCESS
    run = await env.run(new)
    assert run is not None and str(run["parent_run_id"]) == origin and run["tags"]["why"] == "gate fixed"
    assert effects.read_text().split() == ["one"]  # step one was reused, not run again


async def test_statuses_filtered_by_job_and_status(env: Env, client: Client) -> None:
    await env.start()
    ok, fail = [Step("a", command=["true"])], [Step("a", command=["false"])]
    async with (
        client.statuses(job="etl.daily") as by_job,
        client.statuses(status=RunStatus.FAILURE) as failures,
        client.statuses(job="etl.daily", status="SUCCESS") as both,
    ):
        jobs, fails, boths = Collector(by_job), Collector(failures), Collector(both)
        mine = await client.launch("etl.daily", ok)
        lookalike = await client.launch("etl_daily", ok)  # the same routing key: filtered by the job itself
        failed = await client.launch("etl.daily", fail)
        other_failed = await client.launch("other", fail)
        for run_id in (mine, lookalike, failed, other_failed):
            await client.wait(run_id, timeout=30)
        await jobs.until(lambda: len(jobs.of(failed)) == 4 and len(jobs.of(mine)) == 4, "etl.daily's statuses")
        await fails.until(lambda: len(fails.changes) == 2, "both failures")
        await boths.until(lambda: boths.changes, "the SUCCESS of etl.daily")
        for collector in (jobs, fails, boths):
            await collector.close()
    assert jobs.of(mine) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]
    assert jobs.of(failed) == ["QUEUED", "STARTING", "STARTED", "FAILURE"]
    assert not jobs.of(lookalike) and all(c.job == "etl.daily" for c in jobs.changes)
    assert sorted(c.run_id for c in fails.changes) == sorted([failed, other_failed])
    assert [(c.run_id, c.status) for c in boths.changes] == [(mine, RunStatus.SUCCESS)]
    assert all(c.message_id and c.message_id.startswith("status-") for c in jobs.changes)


async def test_a_status_published_twice_is_yielded_once(env: Env, client: Client) -> None:
    """As after a relay crash between publishing and deleting an outbox row: same message_id."""
    body = {
        "v": 1,
        "run_id": "6c0d6a70-64b4-4a53-9a5a-1c2b8e3a1f00",
        "job": "dup",
        "status": "SUCCESS",
        "previous_status": "STARTED",
        "attempt": 1,
        "reason": None,
        "ts": "2026-01-01T00:00:00.000000Z",
        "tags": {},
        "parent_run_id": None,
    }
    async with client.statuses(job="dup") as stream:
        for message_id in ("status-7", "status-7", "status-8"):
            await env.broker.publish_status("SUCCESS.dup", orjson.dumps(body), message_id=message_id)
        await env.broker.publish_status("SUCCESS.dup", b"{not json", message_id="status-9")  # skipped, logged
        first = await asyncio.wait_for(anext(stream), 10)
        second = await asyncio.wait_for(anext(stream), 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 1)
    assert [first.message_id, second.message_id] == ["status-7", "status-8"]
    assert first.status is RunStatus.SUCCESS and first.previous_status is RunStatus.STARTED and not first.resumed


def test_status_bindings() -> None:
    assert status_bindings() == ["#"]
    assert status_bindings(job="a.b") == ["*.a_b"]
    assert status_bindings(status="FAILURE") == ["FAILURE.#"]
    assert status_bindings(job="etl", status=RunStatus.SUCCESS) == ["SUCCESS.etl"]
    with pytest.raises(ValueError):
        status_bindings(status="DONE")


async def test_a_bad_step_is_refused_locally_with_the_services_own_reason(env: Env, client: Client) -> None:
    await env.start({"launcher": 1})
    cases = [
        [Step("a", command=["true"], call="m:f")],
        [Step("a", command=["true"], deps=["b"]), Step("b", command=["true"], deps=["a"])],
        [Step("a", call="no_function_here")],
        [Step("a", command=["true"], timeout_seconds=0)],
    ]
    local = []
    for steps in cases:
        with pytest.raises(InvalidMessage) as refused:
            await client.launch("bad", steps)
        local.append(str(refused.value))
    with pytest.raises(InvalidMessage, match="runherd/priority: expected an integer"):
        Launch("bad", [Step("a", command=["true"])], tags={"runherd/priority": "high"})
    assert (await env.store.fetch("SELECT count(*) AS n FROM runs"))[0]["n"] == 0  # nothing was sent
    # The same bodies, sent around the client, are dead-lettered by the service with the same sentence.
    for steps in cases:
        body = {"v": 1, "job": "bad", "steps": [s.to_json() for s in steps]}
        await env.broker.publish("runherd.commands", "launch", orjson.dumps(body))
    remote = [m.headers[ERROR_HEADER] for m in await _dead_letters(env.amqp_url, len(cases))]
    assert sorted(remote) == sorted(local), (remote, local)


async def _dead_letters(amqp_url: str, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with await aio_pika.connect(amqp_url) as connection:
        queue = await (await connection.channel()).get_queue("runherd.dead-letters")

        async def enough() -> bool:
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
                got.append(message)
            return len(got) >= count

        await eventually(enough, 30, what=f"{count} dead letters")
    return got


async def test_statuses_survive_a_cut_connection(env: Env) -> None:
    """The client reaches RabbitMQ through a TCP proxy that the test cuts; the services do not."""
    await env.start()
    proxy = await Proxy("127.0.0.1", 5672).start()
    vhost = env.amqp_url.rsplit("/", 1)[1]
    try:
        async with (
            await Client.connect(f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}") as client,
            client.statuses(job="client-cut") as stream,
        ):
            seen = Collector(stream)
            before = await client.launch("client-cut", [Step("a", command=["true"])])
            await seen.until(lambda: "SUCCESS" in seen.of(before), "the first run's statuses")
            proxy.cut()
            cut_at = time.monotonic()
            # Runs launched around the service-side, one at a time, until the stream sees one again.
            probes: list[str] = []

            async def a_probe_seen() -> bool:
                if probes and "SUCCESS" in seen.of(probes[-1]):
                    return True
                if not probes or "QUEUED" not in seen.of(probes[-1]):
                    probes.append(await env.submit([{"key": "a", "command": ["true"]}], job="client-cut"))
                await asyncio.sleep(0.3)
                return False

            await eventually(a_probe_seen, 60, interval=0, what="a status after the cut")
            back_after = time.monotonic() - cut_at
            after = await client.launch("client-cut", [Step("a", command=["true"])])  # through the proxy again
            await seen.until(lambda: "SUCCESS" in seen.of(after), "the last run's statuses")
            await seen.close()
        assert stream.reconnects == 1 and proxy.cuts == 1
        assert seen.of(before) == seen.of(after) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]
        print(f"statuses flowed again {back_after:.2f} s after the cut; {len(probes)} probe run(s)")
    finally:
        await proxy.close()


async def test_statuses_survive_the_broker_closing_every_connection(env: Env) -> None:
    """As when RabbitMQ restarts: the broker closes the client's and the services' connections."""
    await env.start()
    vhost = env.amqp_url.rsplit("/", 1)[1]
    async with (
        await Client.connect(env.amqp_url, env.db_url) as client,
        client.statuses(job="client-restart") as stream,
    ):
        seen = Collector(stream)
        await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test: broker restart"],
            check=True,
            timeout=60,
        )
        await eventually(lambda: stream.reconnects == 1, 30, what="the stream to notice the closed connection")

        async def launched_and_seen() -> bool:
            run_id = await client.launch("client-restart", [Step("a", command=["true"])])
            await client.wait(run_id, timeout=30)  # the services reconnect too
            await asyncio.sleep(0.5)
            return seen.of(run_id) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]

        await eventually(launched_and_seen, 60, interval=0, what="a full run seen after the restart")
        await seen.close()


@pytest.mark.slow
@pytest.mark.skipif(not available(), reason="no RabbitMQ server binary here to start a private node")
async def test_statuses_survive_a_restart_of_a_private_rabbitmq_node(env: Env) -> None:
    """A RabbitMQ node of the test's own (never the machine's), stopped and started again under the
    services and the client."""
    node = PrivateRabbit(env.tmp / "rabbit")
    try:
        await node.start()
        await env.start(cfg=config.from_mapping({**env.raw_config(), "amqp_url": node.url}))
        async with (
            await Client.connect(node.url, env.db_url) as client,
            client.statuses(job="client-node") as stream,
        ):
            seen = Collector(stream)
            before = await client.launch("client-node", [Step("a", command=["true"])])
            await seen.until(lambda: "SUCCESS" in seen.of(before), "the first run's statuses")
            down_at = time.monotonic()
            await node.stop()
            await node.start()
            restarted_in = time.monotonic() - down_at
            await eventually(lambda: stream.reconnects >= 1, 60, what="the stream to notice the restart")

            async def launched_and_seen() -> bool:
                run_id = await client.launch("client-node", [Step("a", command=["true"])])
                await client.wait(run_id, timeout=60)  # the services reconnected too
                await asyncio.sleep(0.5)
                return seen.of(run_id) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]

            await eventually(launched_and_seen, 90, interval=0, what="a full run seen after the restart")
            back_in = time.monotonic() - down_at
            await seen.close()
        assert seen.of(before) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]
        print(f"node back in {restarted_in:.1f} s; a whole run seen {back_in:.1f} s after the stop")
    finally:
        await env.stop_all()
        await node.remove()


async def test_a_resume_is_published_as_started_to_started(env: Env, client: Client) -> None:
    """Item 5: SIGKILL the worker; subscribers see STARTED -> STARTED with attempt 2 and the reason."""
    await env.start()
    async with client.statuses(job="client-resume") as stream:
        seen = Collector(stream)
        run_id = await client.launch("client-resume", [Step("a", command=HANG_ON_FIRST)])

        async def step_running() -> bool:
            return any(e["type"] == "STEP_START" for e in await env.events(run_id))

        await eventually(step_running, 30, what="the step running")
        os.kill((await env.handle(run_id, attempt=1))["pid"], signal.SIGKILL)
        assert (await client.wait(run_id, timeout=30)).status is RunStatus.SUCCESS
        await seen.until(lambda: "SUCCESS" in seen.of(run_id), "the SUCCESS status")
        await seen.close()
    assert seen.of(run_id) == ["QUEUED", "STARTING", "STARTED", "STARTED", "SUCCESS"]
    [resume] = [c for c in seen.changes if c.resumed]
    assert resume.attempt == 2 and resume.previous_status is RunStatus.STARTED
    assert resume.reason is not None and "SIGKILL" in resume.reason and "resume attempt 1 of 3" in resume.reason
    assert [c.attempt for c in seen.changes if c.run_id == run_id] == [0, 1, 1, 2, 2]
