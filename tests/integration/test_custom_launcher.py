"""A launcher of one's own (`run_launcher: {module, class, config}`) through the real services.

The launcher is the README's example, examples/custom_launcher.py: workers under `nice`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest
import yaml

from runherd import app, config
from runherd.errors import ConfigError
from tests.harness import ROOT, Env, eventually, status_log

NICE = {"module": "examples.custom_launcher", "class": "NiceLauncher"}


def expected_niceness(added: int) -> int:
    return min(19, os.nice(0) + added)  # nice adds to the niceness the launcher itself runs at


async def test_custom_launcher_runs_a_job_end_to_end(env: Env) -> None:
    env.configure(run_launcher={**NICE, "config": {"niceness": 7, "env": {"TEAM": "data"}}})
    out = env.tmp / "seen"
    async with status_log(env.amqp_url) as statuses:
        await env.start()
        run_id = await env.submit(
            [
                {"key": "probe", "command": ["sh", "-c", f'echo "$(nice) $TEAM" > {out}']},
                {"key": "after", "command": ["true"], "deps": ["probe"]},
            ]
        )
        run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
        await eventually(lambda: "SUCCESS" in statuses.of(run_id), what="the SUCCESS status message")

    assert run["status"] == "SUCCESS", run["reason"]
    assert statuses.of(run_id) == ["QUEUED", "STARTING", "STARTED", "SUCCESS"]
    # The step ran niced, with the launcher's extra env.
    assert out.read_text().split() == [str(expected_niceness(7)), "data"]
    # The custom launcher's handle is what runherd recorded for the attempt.
    handle = await env.handle(run_id, attempt=1)
    assert handle["launcher"] == "nice" and handle["niceness"] == 7 and isinstance(handle["pid"], int)
    rows = await env.store.fetch("SELECT launcher FROM attempts WHERE run_id = $1", uuid.UUID(run_id))
    assert [r["launcher"] for r in rows] == ["nice"]

    # Its watch() reported the exit, with its own debug_info.
    async def exited() -> list[dict[str, object]]:
        return [e for e in await env.events(run_id) if e["type"] == "WORKER_EXITED"]

    [event] = await eventually(exited, what="the WORKER_EXITED event")
    assert "worker ran at niceness 7" in event["data"]["debug_info"]


async def test_custom_launcher_crash_is_resumed(env: Env) -> None:
    env.configure(run_launcher={**NICE, "config": {"niceness": 3}})
    await env.start()
    started = env.tmp / "started"
    run_id = await env.submit(
        [{"key": "a", "command": ["sh", "-c", f'if [ "$RUNHERD_ATTEMPT" = 1 ]; then touch {started}; sleep 600; fi']}]
    )
    await eventually(started.exists, what="the first attempt's step to start")
    os.kill((await env.handle(run_id, attempt=1))["pid"], signal.SIGKILL)

    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert (run["status"], run["attempt"]) == ("SUCCESS", 2)
    assert (await env.handle(run_id, attempt=2))["launcher"] == "nice"
    assert [e["type"] for e in await env.events(run_id)].count("RUN_RESUMED") == 1


BAD = {
    "module": (
        {"module": "examples.no_such_module", "class": "NiceLauncher"},
        "run_launcher.module: cannot import 'examples.no_such_module'",
    ),
    "class": (
        {"module": "examples.custom_launcher", "class": "NoSuchLauncher"},
        "run_launcher.class: 'examples.custom_launcher' has no class 'NoSuchLauncher'",
    ),
    "not-a-launcher": (
        {"module": "examples.custom_launcher", "class": "ConfigError"},
        "does not implement the launcher interface (missing: launch, terminate",
    ),
    "config": (
        {**NICE, "config": {"niceness": "high"}},
        "run_launcher.config.niceness: expected an integer from 1 to 19, got 'high'",
    ),
    "config-key": ({**NICE, "config": {"colour": "blue"}}, "run_launcher.config.colour: unknown key"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_module_class_or_config_is_refused_at_start(case: str) -> None:
    launcher, message = BAD[case]
    cfg = config.from_mapping({"run_launcher": launcher})  # the section parses: the launcher is checked at start
    with pytest.raises(ConfigError) as caught:
        # Refused before any connection is made (the default URLs here lead nowhere in particular).
        await app.start(cfg, {"launcher": 1, "heartbeat": 1, "monitor": 1})
    assert message in str(caught.value)


def test_cli_refuses_a_bad_launcher_module_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "runherd.yaml"
    path.write_text(yaml.safe_dump({"run_launcher": {"module": "examples.no_such_module", "class": "X"}}))
    result = subprocess.run(
        [sys.executable, "-m", "runherd.cli", "--config", str(path), "launcher"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "run_launcher.module: cannot import 'examples.no_such_module'" in lines[0], lines
