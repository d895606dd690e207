"""Issue 5: re-execution of a finished run as a new run (the `reexecute` message and
`runherd reexecute`), and the lineage `runherd show` prints."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from runherd.broker import ERROR_HEADER
from tests import harness
from tests.harness import ROOT, Env, eventually

# --- `call` steps of these tests (run by the worker: `tests.integration.test_reexecute:produce`) -------


def produce(inputs: dict[str, Any]) -> dict[str, int]:
    """Counts its executions in $EFFECTS; its output is what a re-execution must reuse."""
    with open(os.environ["EFFECTS"], "a") as f:
        f.write("produce\n")
    return {"value": 41}


def consume(inputs: dict[str, Any]) -> int:
    """Fails the first time it runs, then adds one to produce's output."""
    with open(os.environ["EFFECTS"], "a") as f:
        f.write("consume\n")
    flag = Path(os.environ["EFFECTS"] + ".flag")
    if not flag.exists():
        flag.touch()
        raise RuntimeError("consume fails the first time")
    return int(inputs["produce"]["value"]) + 1


# --- helpers ------------------------------------------------------------------------------------


def plan(env: Env) -> tuple[list[dict[str, Any]], dict[str, str]]:
    module = "tests.integration.test_reexecute"
    steps = [
        {"key": "produce", "call": f"{module}:produce"},
        {"key": "consume", "call": f"{module}:consume", "deps": ["produce"]},
        {"key": "report", "command": ["sh", "-c", f"echo report >> {env.tmp / 'effects'}"], "deps": ["consume"]},
    ]
    return steps, {"EFFECTS": str(env.tmp / "effects"), "PYTHONPATH": str(ROOT)}


def effects(env: Env) -> list[str]:
    path = env.tmp / "effects"
    return path.read_text().split() if path.exists() else []


async def cli(env: Env, *args: str) -> tuple[int, str, str]:
    """`runherd ARGS...` against the test's database and vhost: exit code, stdout, stderr."""
    urls = {"RUNHERD_DATABASE_URL": env.db_url, "RUNHERD_AMQP_URL": env.amqp_url, "RUNHERD_CONFIG": os.devnull}
    return await harness.run_cli(*args, env=urls)


async def failed_origin(env: Env) -> str:
    steps, run_env = plan(env)
    origin = await env.submit(steps, env=run_env, tags={"team": "data"})
    run = await env.wait_status(origin, "FAILURE", "SUCCESS")
    assert run["status"] == "FAILURE", run["reason"]
    assert effects(env) == ["produce", "consume"]
    return origin


async def dead_letter(amqp_url: str, timeout: float = 15) -> aio_pika.abc.AbstractIncomingMessage:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        queue = await (await connection.channel()).get_queue("runherd.dead-letters")

        async def one() -> aio_pika.abc.AbstractIncomingMessage | None:
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
            return message

        return await eventually(one, timeout, what="a dead letter")


# --- tests --------------------------------------------------------------------------------------


async def test_reexecute_message_from_failure_reuses_outputs_and_never_reruns_succeeded_steps(env: Env) -> None:
    await env.start()
    origin = await failed_origin(env)
    new_id = str(uuid.uuid4())
    await env.broker.publish_command(
        "reexecute",
        orjson.dumps(
            {"v": 1, "run_id": origin, "strategy": "FROM_FAILURE", "tags": {"note": "fixed"}, "new_run_id": new_id}
        ),
    )
    run = await env.wait_status(new_id, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS", run["reason"]
    assert effects(env) == ["produce", "consume", "consume", "report"]  # produce never ran again
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert steps["produce"]["reused"] and steps["produce"]["output"] == {"value": 41}
    assert steps["consume"]["output"] == 42  # computed from the reused output
    assert not steps["consume"]["reused"] and not steps["report"]["reused"]
    assert str(run["parent_run_id"]) == origin and str(run["root_run_id"]) == origin and run["retry_number"] == 0
    assert run["tags"]["note"] == "fixed" and run["tags"]["team"] == "data"
    assert run["tags"]["runherd/parent_run_id"] == origin
    # The worker was told which steps it reuses.
    start = [e for e in await env.events(new_id) if e["type"] == "RUN_START"]
    assert start and start[0]["data"]["reused"] == ["produce"]

    code, out, err = await cli(env, "show", new_id)
    assert code == 0, err
    print(out)
    assert f"lineage  root {origin}  parent {origin}  retry 0  re-run as -" in out
    assert f"reused   produce (outputs from run {origin}, not executed)" in out
    assert f"{origin}  FAILURE   root" in out and f"{new_id}  SUCCESS   re-execution of {origin}, 1 step reused" in out
    code, out, _ = await cli(env, "show", origin, "--json")
    view = orjson.loads(out)
    assert view["children"] == [new_id] and [r["run_id"] for r in view["lineage"]] == [origin, new_id]
    assert view["reused_steps"] == [] and view["failure_kind"] == "step"


async def test_cli_reexecute_all_steps_with_tags_and_max_runtime_then_again_keeps_the_root(env: Env) -> None:
    await env.start()
    origin = await failed_origin(env)
    code, out, err = await cli(
        env, "reexecute", origin, "--strategy", "ALL_STEPS", "--tag", "k=v", "--max-runtime", "30"
    )
    assert code == 0, err
    first = out.strip()
    run = await env.wait_status(first, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS"
    assert effects(env) == ["produce", "consume", "produce", "consume", "report"]  # everything ran again
    assert not any(s["reused"] for s in run["steps_status"])
    assert run["tags"]["k"] == "v" and run["tags"]["runherd/max_runtime"] == 30 and run["max_runtime_seconds"] == 30
    # Re-executing the re-execution (FROM_FAILURE of a SUCCESS: every step reused, none runs) keeps the root.
    code, out, err = await cli(env, "reexecute", first)
    assert code == 0, err
    second = out.strip()
    run = await env.wait_status(second, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS" and len(effects(env)) == 5
    assert all(s["reused"] for s in run["steps_status"]) and len(run["steps_status"]) == 3
    assert str(run["parent_run_id"]) == first and str(run["root_run_id"]) == origin
    code, out, _ = await cli(env, "show", origin, "--json")
    assert [r["run_id"] for r in orjson.loads(out)["lineage"]] == [origin, first, second]


async def test_reexecute_refuses_a_missing_or_unfinished_origin(env: Env) -> None:
    env.configure(run_coordinator={"max_concurrent_runs": 0})  # runs stay QUEUED
    await env.start({"launcher": 1})
    queued = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(queued, "QUEUED")
    missing = str(uuid.uuid4())

    code, _, err = await cli(env, "reexecute", missing)
    assert code == 2 and err.strip() == f"runherd: no run {missing}"
    code, _, err = await cli(env, "reexecute", queued)
    assert code == 2 and "is QUEUED: only a finished run can be re-executed" in err
    code, _, err = await cli(env, "reexecute", queued, "--strategy", "SOME")
    assert code == 2 and "invalid choice" in err

    for origin, reason in (
        (missing, f"reexecute: no run {missing}"),
        (queued, f"reexecute: run {queued} is QUEUED, not finished"),
    ):
        await env.broker.publish_command("reexecute", orjson.dumps({"v": 1, "run_id": origin}))
        dead = await dead_letter(env.amqp_url)
        assert dead.headers[ERROR_HEADER].startswith(reason), dead.headers[ERROR_HEADER]
    await env.broker.publish_command("reexecute", orjson.dumps({"v": 1, "run_id": queued, "strategy": "SOME"}))
    assert "strategy: expected FROM_FAILURE or ALL_STEPS" in (await dead_letter(env.amqp_url)).headers[ERROR_HEADER]
    assert (await env.store.fetch("SELECT count(*) AS n FROM runs"))[0]["n"] == 1  # nothing was written
