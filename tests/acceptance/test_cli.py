"""The `runherd` command as a user runs it: a subprocess against real services."""

from __future__ import annotations

import asyncio
import subprocess

import orjson

from tests.harness import PYTHON, ROOT, Env, eventually


async def runherd(env: Env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [PYTHON, "-m", "runherd.cli", "--config", str(env.config_file()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


async def test_submit_wait_show_events_runs(env: Env) -> None:
    await env.start()
    job = env.tmp / "job.yaml"
    job.write_text(
        "job: cli.demo\nsteps:\n  - {key: a, command: [sh, -c, 'echo hi']}\n"
        "  - {key: b, call: 'examples.steps:count_words', deps: [a]}\n"
    )
    done = await runherd(env, "submit", str(job), "--tag", "team=data", "--wait")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    run_id, status = lines[0], lines[-1]
    assert status == "SUCCESS"
    shown = await runherd(env, "show", run_id, "--json")
    view = orjson.loads(shown.stdout)
    assert view["run_id"] == run_id and view["status"] == "SUCCESS" and view["tags"]["team"] == "data"
    assert view["root_run_id"] == run_id and view["parent_run_id"] is None and view["attempt"] == 1
    assert [(s["key"], s["status"]) for s in view["steps"]] == [("a", "SUCCESS"), ("b", "SUCCESS")]
    assert isinstance(view["worker"]["pid"], int)
    table = await runherd(env, "show", run_id)
    assert "SUCCESS" in table.stdout and "lineage" in table.stdout
    events = await runherd(env, "events", run_id)
    assert "STEP_SUCCESS" in events.stdout and "QUEUED -> STARTING" in events.stdout
    listing = await runherd(env, "runs", "--job", "cli.demo", "--json")
    assert [r["run_id"] for r in orjson.loads(listing.stdout)] == [run_id]
    text = await runherd(env, "runs", "--status", "SUCCESS")
    assert run_id in text.stdout and "RUN_ID" in text.stdout


async def test_submit_wait_exits_1_on_failure_and_cancel(env: Env) -> None:
    await env.start()
    failing = env.tmp / "fail.json"
    failing.write_text(orjson.dumps({"job": "f", "steps": [{"key": "a", "command": ["false"]}]}).decode())
    done = await runherd(env, "submit", str(failing), "--wait")
    assert done.returncode == 1 and done.stdout.splitlines()[-1] == "FAILURE"
    failed_id = done.stdout.splitlines()[0]

    async def exited() -> bool:
        return any(e["type"] == "WORKER_EXITED" for e in await env.events(failed_id))

    await eventually(exited, what="the worker's exit in the log")
    log = await runherd(env, "events", failed_id)
    assert "WORKER_EXITED" in log.stdout and "      | " in log.stdout  # the worker log's tail, for a person
    slow = env.tmp / "slow.yaml"
    slow.write_text("job: s\nsteps:\n  - {key: a, command: [sleep, '600']}\n")
    submitted = await runherd(env, "submit", str(slow))
    run_id = submitted.stdout.strip()
    await env.wait_status(run_id, "STARTED")
    canceled = await runherd(env, "cancel", run_id)
    assert canceled.returncode == 0
    await env.wait_status(run_id, "CANCELED")


async def test_bad_input_exits_2_with_one_line(env: Env) -> None:
    cyclic = env.tmp / "cyclic.yaml"
    cyclic.write_text("job: c\nsteps:\n  - {key: a, command: [x], deps: [b]}\n  - {key: b, command: [x], deps: [a]}\n")
    cases = [
        (["submit", str(cyclic)], "cycle"),
        (["submit", str(env.tmp / "missing.yaml")], "cannot read"),
        (["show", "not-a-uuid"], "expected a UUID"),
        (["runs", "--status", "DONE"], "unknown status"),
        (["submit", str(cyclic), "--tag", "novalue"], "key=value"),
        (["frobnicate"], "invalid choice"),
    ]
    for args, expected in cases:
        result = await runherd(env, *args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("runherd")]
        assert any(expected in line for line in lines), (args, result.stderr)
    bad_config = env.tmp / "bad.yaml"
    bad_config.write_text("run_monitoring:\n  start_timeout: 3\n")
    result = await asyncio.to_thread(
        subprocess.run,
        [PYTHON, "-m", "runherd.cli", "--config", str(bad_config), "runs"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "runherd: config: run_monitoring.start_timeout: unknown key "
        "(known: cancel_timeout_seconds, enabled, heartbeat_interval_seconds, heartbeat_timeout_seconds, "
        "max_resume_run_attempts, max_runtime_seconds, poll_interval_seconds, start_timeout_seconds)"
    )


async def test_up_with_two_monitors_and_watch(env: Env) -> None:
    up = env.spawn("up", "--monitors", "2")
    watch = subprocess.Popen(
        [PYTHON, "-m", "runherd.cli", "--config", str(env.config_file()), "watch", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        text=True,
    )
    env.processes.append(watch)
    try:
        job = env.tmp / "job.yaml"
        job.write_text("job: watched\nsteps:\n  - {key: a, command: ['true']}\n")
        await eventually(lambda: _watch_subscribed(env), timeout=30, interval=0.3, what="watch subscribed")
        done = await runherd(env, "submit", str(job), "--wait")
        assert done.returncode == 0, done.stderr
        run_id = done.stdout.splitlines()[0]
        seen: list[str] = []

        def read_until_success() -> None:
            assert watch.stdout is not None
            for line in watch.stdout:
                body = orjson.loads(line)
                if body["run_id"] == run_id:
                    seen.append(body["status"])
                    if body["status"] == "SUCCESS":
                        return

        await asyncio.wait_for(asyncio.to_thread(read_until_success), 30)
        assert seen[-1] == "SUCCESS"
        assert up.poll() is None
    finally:
        watch.kill()


def _watch_subscribed(env: Env) -> bool:
    vhost = env.amqp_url.rsplit("/", 1)[1]
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_bindings", "-p", vhost, "source_name"], capture_output=True, text=True, timeout=30
    ).stdout
    return "runherd.status" in out
