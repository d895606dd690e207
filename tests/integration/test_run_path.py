"""Issue 2: the whole run path on real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import uuid

import aio_pika
import orjson

from tests.harness import Env, eventually, group_members, status_log


async def test_three_step_job_published_with_plain_aio_pika(env: Env) -> None:
    await env.start()
    run_id = str(uuid.uuid4())
    async with status_log(env.amqp_url) as statuses:
        connection = await aio_pika.connect_robust(env.amqp_url)
        async with connection:
            channel = await connection.channel()
            commands = await channel.get_exchange("runherd.commands")
            body = {
                "v": 1,
                "run_id": run_id,
                "job": "nightly.etl",
                "steps": [
                    {"key": "extract", "command": ["sh", "-c", "echo extracting"]},
                    {"key": "transform", "command": ["sh", "-c", "echo transforming"], "deps": ["extract"]},
                    {"key": "load", "command": ["sh", "-c", "echo loading"], "deps": ["transform"]},
                ],
            }
            await commands.publish(aio_pika.Message(orjson.dumps(body)), routing_key="launch")
        await env.wait_status(run_id, "SUCCESS")
        await eventually(lambda: len(statuses.of(run_id)) >= 4, what="four status messages")
        assert statuses.of(run_id) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]
        last = [m for m in statuses.messages if m["run_id"] == run_id][-1]
        assert last["_routing_key"] == "SUCCESS.nightly_etl"
        assert last["previous_status"] == "STARTED" and last["job"] == "nightly.etl" and last["v"] == 1
        assert last["ts"].endswith("Z") and "." in last["ts"]
    events = await env.events(run_id)
    for key in ("extract", "transform", "load"):
        kinds = [e["type"] for e in events if e["step_key"] == key]
        assert kinds == ["STEP_START", "STEP_SUCCESS"], (key, kinds)
    seqs = [e["seq"] for e in events if e["seq"] is not None and e["source"].startswith("worker:")]
    assert seqs and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    log_path = (await env.handle(run_id))["log_path"]
    assert "transforming" in open(log_path).read()


async def test_failing_step_fails_run_and_downstream_never_starts(env: Env) -> None:
    await env.start()
    marker = env.tmp / "downstream-ran"
    run_id = await env.submit(
        [
            {"key": "ok", "command": ["true"]},
            {"key": "boom", "command": ["sh", "-c", "echo 'disk full' >&2; exit 7"], "deps": ["ok"]},
            {"key": "after", "command": ["touch", str(marker)], "deps": ["boom"]},
        ]
    )
    run = await env.wait_status(run_id, "FAILURE")
    assert "boom" in run["reason"]
    events = await env.events(run_id)
    failure = [e for e in events if e["type"] == "STEP_FAILURE"]
    assert len(failure) == 1 and failure[0]["step_key"] == "boom"
    assert "exited with code 7" in failure[0]["message"] and "disk full" in failure[0]["message"]
    assert not [e for e in events if e["step_key"] == "after"]
    assert not marker.exists()


async def test_call_step_outputs_reach_downstream_call_steps(env: Env) -> None:
    await env.start()
    run_id = await env.submit(
        [
            {"key": "numbers", "call": "tests.fixtures.steps:numbers"},
            {"key": "total", "call": "tests.fixtures.steps:total", "deps": ["numbers"]},
            {"key": "report", "call": "tests.fixtures.steps:report", "deps": ["total", "numbers"]},
        ],
        env={"PYTHONPATH": str(env.tmp.parent.parent)},
    )
    await env.wait_status(run_id, "SUCCESS")
    steps = {s["step_key"]: s for s in (await env.run(run_id))["steps_status"]}  # type: ignore[index]
    assert steps["numbers"]["output"] == [1, 2, 3, 4]
    assert steps["total"]["output"] == {"sum": 10}
    assert steps["report"]["output"] == "4 numbers summing to 10"


async def test_cancel_running_run_leaves_no_process(env: Env) -> None:
    await env.start()
    pid_file = env.tmp / "step.pid"
    run_id = await env.submit([{"key": "long", "command": ["sh", "-c", f"echo $$ > {pid_file}; sleep 60"]}])
    await eventually(pid_file.exists, what="the step to start")
    handle = await env.handle(run_id)
    step_pid = int(pid_file.read_text())
    await env.cancel(run_id)
    run = await env.wait_status(run_id, "CANCELED")
    assert run["reason"]
    await eventually(
        lambda: not group_members(handle["pid"]) and not group_members(step_pid),
        what="worker and step process groups gone",
    )
    types = [e["type"] for e in await env.events(run_id)]
    assert "RUN_CANCELED" in types


async def test_cancel_queued_run(env: Env) -> None:
    env.configure(run_coordinator={"max_concurrent_runs": 0})
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(run_id, "QUEUED")
    await env.cancel(run_id)
    run = await env.wait_status(run_id, "CANCELED")
    assert run["attempt"] == 0


async def test_independent_steps_run_concurrently(env: Env) -> None:
    await env.start()

    def rendezvous(mine: str, theirs: str) -> list[str]:
        """Succeeds only if the other step is running at the same time (each waits for the other)."""
        return [
            "sh",
            "-c",
            f"touch {env.tmp / mine}; for i in $(seq 50); do [ -e {env.tmp / theirs} ] && exit 0;"
            " sleep 0.1; done; exit 1",
        ]

    run_id = await env.submit(
        [
            {"key": "left", "command": rendezvous("left", "right")},
            {"key": "right", "command": rendezvous("right", "left")},
            {"key": "join", "command": ["true"], "deps": ["left", "right"]},
        ]
    )
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS", run["reason"]
