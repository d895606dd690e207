"""Issue 11, item 3: `runherd reexecute --with` (Metaflow's resume --with) as a user runs it."""

from __future__ import annotations

import orjson

from runherd.broker import ERROR_HEADER
from tests.acceptance.test_cli import runherd
from tests.harness import Env
from tests.integration.test_bad_input import _dead_letters


def lines(path: object) -> list[str]:
    try:
        with open(str(path)) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


async def test_with_overrides_a_retry_and_a_timeout_in_a_from_failure_reexecution(env: Env) -> None:
    await env.start()
    effects = env.tmp / "effects"
    origin = await env.submit(
        [
            {"key": "one", "command": ["sh", "-c", f"echo one >> {effects}"]},
            # fails its first try, whatever the run
            {
                "key": "flaky",
                "command": ["sh", "-c", f'echo flaky$RUNHERD_STEP_TRY >> {effects}; [ "$RUNHERD_STEP_TRY" -ge 2 ]'],
                "deps": ["one"],
            },
            # needs 1 s, has 0.3 s
            {
                "key": "slow",
                "command": ["sh", "-c", f"echo slow >> {effects}; sleep 1"],
                "deps": ["one"],
                "timeout_seconds": 0.3,
            },
        ],
        tags={"runherd/max_retries": 0},
    )
    failed = await env.wait_status(origin, "FAILURE", "SUCCESS")
    assert failed["status"] == "FAILURE"
    assert sorted(lines(effects)) == ["flaky1", "one", "slow"]

    done = await runherd(
        env,
        "reexecute",
        origin,
        "--with",
        "flaky=retry:2",
        "--with",
        "slow=timeout:30",
        "--with",
        "*=retry:0",
        "--job-name",
        "again",
        "--max-runtime",
        "120",
        "--executor",
        "multiprocess",
    )
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip()
    run = await env.wait_status(new, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS", run["reason"]
    # one reused (never run again); flaky's try 1 failed and try 2 succeeded; slow had time
    assert sorted(lines(effects)) == ["flaky1", "flaky1", "flaky2", "one", "slow", "slow"]
    assert run["job"] == "again" and run["tags"]["runherd/max_runtime"] == 120
    steps = {s["key"]: s for s in run["steps"]}
    assert steps["flaky"]["retry"]["max_retries"] == 2 and steps["slow"]["timeout_seconds"] == 30
    assert steps["slow"]["retry"]["max_retries"] == 0  # * applied where no step was named
    origin_steps = {s["key"]: s for s in failed["steps"]}
    assert "retry" not in origin_steps["flaky"] and origin_steps["slow"]["timeout_seconds"] == 0.3

    shown = orjson.loads((await runherd(env, "show", new, "--json")).stdout)
    assert shown["overrides"] == {
        "with": ["flaky=retry:2", "slow=timeout:30", "*=retry:0"],
        "job_name": "again",
        "max_runtime": 120,
        "executor": "multiprocess",
    }
    assert shown["executor"] == {"name": "multiprocess", "max_concurrent": 4}
    tries = {s["key"]: s["tries"] for s in shown["steps"]}
    assert [(t["try"], t["status"]) for t in tries["flaky"]] == [(1, "FAILURE"), (2, "SUCCESS")]
    assert "exited with code 1" in tries["flaky"][0]["reason"]
    text = (await runherd(env, "show", new)).stdout
    assert "given    with ['flaky=retry:2'" in text and "flaky  try 1 (attempt 1) FAILURE: exited with code 1" in text

    # A bad override exits 2 at the command line, and is dead-lettered with its reason as a message.
    bad = await runherd(env, "reexecute", origin, "--with", "nope=retry:1")
    assert bad.returncode == 2 and "the run has no step 'nope'" in bad.stderr
    body = orjson.dumps({"v": 1, "run_id": origin, "with": ["flaky=retry:many"]})
    await env.broker.publish("runherd.commands", "reexecute", body)
    [dead] = await _dead_letters(env.amqp_url, 1)
    assert "with[0] 'flaky=retry:many': retry takes a number of retries" in dead.headers[ERROR_HEADER]
