"""The CLI never leaves its user guessing (issue 13, item 8): the real `runherd` command as a
subprocess against the harness's services, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
import yaml

from runherd import cli
from tests import harness
from tests.acceptance.test_cli import runherd
from tests.harness import PYTHON, ROOT, Env, eventually


def _popen(env: Env, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [PYTHON, "-m", "runherd.cli", "--config", str(env.config_file()), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    env.processes.append(proc)  # type: ignore[arg-type]
    return proc


async def _readline(stream: object, timeout: float) -> str:
    return await asyncio.wait_for(asyncio.to_thread(stream.readline), timeout)  # type: ignore[attr-defined]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("runherd: "), stderr
    return lines[0]


async def test_submit_wait_prints_each_change_as_it_happens_and_why_it_failed(env: Env) -> None:
    await env.start()
    gate = env.tmp / "gate"
    job = env.tmp / "job.yaml"
    script = f"echo preparing; while [ ! -e {gate} ]; do sleep 0.1; done; echo 'relation users missing' >&2; exit 3"
    job.write_text(yaml.safe_dump({"job": "wait.fail", "steps": [{"key": "load", "command": ["sh", "-c", script]}]}))
    proc = _popen(env, "submit", str(job), "--wait")
    run_id = (await _readline(proc.stdout, 30)).strip()
    seen: list[str] = []
    while not any("-> STARTED" in line for line in seen):
        seen.append(await _readline(proc.stdout, 30))
    # The step is still blocked on the gate: the changes so far were printed while the run is live.
    assert proc.poll() is None
    assert await env.status(run_id) == "STARTED"
    assert [re.sub(r"^\S+\s+", "", line).split("  ")[0] for line in seen] == [
        "- -> QUEUED",
        "QUEUED -> STARTING",
        "STARTING -> STARTED",
    ], seen
    gate.touch()
    rest, stderr = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 1, (rest, stderr)
    out = rest.splitlines()
    assert out[-1] == "FAILURE"
    assert any("STARTED -> FAILURE" in line for line in out), rest
    assert any(line.startswith("reason: ") for line in out), rest
    assert any(line.startswith("step load failed: exited with code 3") for line in out), rest
    assert "  | relation users missing" in out, rest


async def test_submit_wait_exit_codes(env: Env) -> None:
    await env.start()
    ok = env.tmp / "ok.yaml"
    ok.write_text("job: ok\nsteps:\n  - {key: a, command: ['true']}\n")
    done = await runherd(env, "submit", str(ok), "--wait")
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "SUCCESS", done
    slow = env.tmp / "slow.yaml"
    slow.write_text("job: slow\nsteps:\n  - {key: a, command: [sleep, '600']}\n")
    proc = _popen(env, "submit", str(slow), "--wait")
    run_id = (await _readline(proc.stdout, 30)).strip()
    await env.wait_status(run_id, "STARTED")
    await env.cancel(run_id)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 1 and out.splitlines()[-1] == "CANCELED", out


async def test_submit_wait_without_services_says_so_within_seconds(env: Env) -> None:
    job = env.tmp / "job.yaml"
    job.write_text("job: nobody\nsteps:\n  - {key: a, command: ['true']}\n")
    started = time.monotonic()
    proc = _popen(env, "submit", str(job), "--wait")
    line = await _readline(proc.stderr, 20)
    took = time.monotonic() - started
    assert "not accepted after 3 s" in line and "launcher" in line and "stays queued" in line, line
    assert took < 15, took
    print(f"submit --wait without services: warned after {took:.1f} s")
    assert proc.poll() is None  # still waiting: the launch is queued, not lost
    proc.kill()


async def test_unknown_and_finished_runs_exit_2_with_one_line(env: Env) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    for verb in ("show", "events", "cancel"):
        result = await runherd(env, verb, unknown)
        assert result.returncode == 2, (verb, result)
        assert _one_line(result.stderr) == f"runherd: no run {unknown}", verb
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    await env.wait_status(run_id, "SUCCESS")
    result = await runherd(env, "cancel", run_id)
    assert result.returncode == 2
    assert _one_line(result.stderr) == f"runherd: run {run_id} already finished (SUCCESS): nothing to cancel"


async def test_show_lists_steps_in_run_order_with_outputs_and_a_readable_worker(env: Env) -> None:
    await env.start()
    steps = [
        {"key": "zeta", "command": ["true"]},
        {"key": "count", "call": "examples.steps:count_words", "deps": ["zeta"]},
        {"key": "alpha", "command": ["true"], "deps": ["count"]},
    ]
    run_id = await env.submit(steps)
    await env.wait_status(run_id, "SUCCESS")
    view = orjson.loads((await runherd(env, "show", run_id, "--json")).stdout)
    assert [s["key"] for s in view["steps"]] == ["zeta", "count", "alpha"]
    assert view["steps"][1]["output"] == {"words": 3}
    text = (await runherd(env, "show", run_id)).stdout
    table = text[text.index("STEP") :].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["zeta", "count", "alpha"]
    assert '{"words":3}' in table[2]
    worker = next(line for line in text.splitlines() if line.startswith("worker"))
    assert f"pid {view['worker']['pid']}" in worker and "{" not in worker, worker


async def test_events_are_in_time_order(env: Env) -> None:
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}, {"key": "b", "command": ["true"], "deps": ["a"]}])
    await env.wait_status(run_id, "SUCCESS")

    async def exited() -> bool:
        return any(e["type"] == "WORKER_EXITED" for e in await env.events(run_id))

    await eventually(exited, what="the worker's exit report")
    out = (await runherd(env, "events", run_id, "--json")).stdout
    stamps = [datetime.fromisoformat(orjson.loads(line)["ts"]) for line in out.splitlines()]
    assert len(stamps) >= 8 and stamps == sorted(stamps)
    text = (await runherd(env, "events", run_id)).stdout
    clock = [line[:12] for line in text.splitlines() if not line.startswith("      |")]
    assert clock == sorted(clock)


async def test_bad_yaml_keeps_line_and_column(env: Env) -> None:
    bad = env.tmp / "bad.yaml"
    bad.write_text("job: x\nsteps:\n  - key: a\n    command: [sh, -c\n  - key: b\n")
    result = await runherd(env, "submit", str(bad))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    try:
        yaml.safe_load(bad.read_text())
    except yaml.MarkedYAMLError as exc:
        assert exc.problem_mark is not None
        where = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    assert where in line and str(bad) in line, line


async def test_up_on_a_database_never_migrated_says_run_migrate(env: Env, tmp_path: Path) -> None:
    name = f"runherd_empty_{int(time.time() * 1000)}"
    conn = await asyncpg.connect(f"{harness.PG}/postgres")
    await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        for db in (name, name + "_missing"):
            env.configure(database_url=f"{harness.PG}/{db}")
            result = await runherd(env, "up", timeout=60)
            assert result.returncode == 3, result
            assert "run `runherd migrate`" in _one_line(result.stderr), result.stderr
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@pytest.mark.parametrize(
    ("which", "args"),
    [
        ("database", ["runs"]),
        ("database", ["show", "00000000-0000-4000-8000-000000000000"]),
        ("broker", ["submit", "JOB"]),
        ("broker", ["watch"]),
    ],
)
async def test_a_connection_failure_is_one_line(env: Env, which: str, args: list[str]) -> None:
    job = env.tmp / "job.yaml"
    job.write_text("job: j\nsteps:\n  - {key: a, command: ['true']}\n")
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    env.raw = {
        **env.raw_config(),
        "database_url": "postgresql://postgres@127.0.0.1:1/runherd",
        "amqp_url": "amqp://guest:guest@127.0.0.1:1/",
    }
    result = await runherd(env, *[str(job) if a == "JOB" else a for a in args], timeout=60)
    assert result.returncode == 1, result
    line = _one_line(result.stderr)
    assert ("PostgreSQL" if which == "database" else "RabbitMQ") in line, line
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr


def _walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        found.append((path, action))
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                assert name in helped, f"{path} {name}: no help"
                found += _walk(sub, f"{path} {name}")
    return found


async def test_every_argument_has_help_text() -> None:
    actions = _walk(cli._parser(), "runherd")
    # The walk reached every verb, and an argument of each verb that has one.
    assert {path for path, _ in actions} == {"runherd", *(f"runherd {verb}" for verb in cli.VERBS)} - {
        f"runherd {verb}" for verb in ("migrate", "launcher", "heartbeat", "monitor", "worker")
    }
    missing = [f"{path} {a.option_strings or a.dest}" for path, a in actions if not a.help]
    assert missing == []
    result = await asyncio.to_thread(
        subprocess.run, [PYTHON, "-m", "runherd.cli", "prune", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert "--older-than DURATION" in result.stdout and "dry run" in result.stdout.lower()
