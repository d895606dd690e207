"""Issue 12 item 3: process-launcher workers forked from a warm parent (launchers/forkserver.py).
The worker is the fork server's child, not the launcher's; the launcher still reports its exit with
the signal that killed it, and the crash is resumed as with an exec'd worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.harness import Env, eventually

STEP = 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then sleep 600; fi; echo "$PROBE" > "$OUT"'


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode()


def _text(path: Path) -> str:
    return path.read_text().strip()


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


async def test_forked_worker_runs_is_killed_reported_and_resumed(env: Env) -> None:
    launcher = env.process_launcher()
    launcher["config"]["fork_server"] = True
    env.configure(run_launcher=launcher)
    await env.start()
    out = env.tmp / "probe.txt"
    run_id = await env.submit(
        [{"key": "a", "command": ["sh", "-c", STEP]}], env={"PROBE": "from the launch", "OUT": str(out)}
    )
    await env.wait_status(run_id, "STARTED")
    handle = await env.handle(run_id, attempt=1)
    parent = _ppid(handle["pid"])
    assert parent not in (os.getpid(), 1)  # forked by the fork server, not exec'd by the launcher
    assert "runherd.worker.forkserver" in _cmdline(parent)
    os.kill(handle["pid"], signal.SIGKILL)

    async def exit_reported() -> list[dict[str, object]]:
        return [e for e in await env.events(run_id) if e["type"] == "WORKER_EXITED" and e["attempt"] == 1]

    exited = await eventually(exit_reported, timeout=15, what="attempt 1's exit reported")
    assert "signal 9" in str(exited[0]["message"])  # the fork server reaped it and said how it died
    run = await env.wait_status(run_id, "SUCCESS", timeout=30)
    assert run["attempt"] == 2
    assert _text(out) == "from the launch"  # the launch's env reached the forked worker
    second = await env.handle(run_id, attempt=2)
    assert second["pid"] != handle["pid"]


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _ppid(int(entry.name)) == pid:
                    found.add(int(entry.name))
            except (OSError, ValueError):
                continue
    return found


@pytest.mark.parametrize("spares", [0, 2])
async def test_a_launch_is_a_spare_handed_over_or_a_fork_and_spares_go_with_the_server(env: Env, spares: int) -> None:
    """With spares, the fork server keeps children forked ahead and hands each launch to one (its
    env, cwd and descriptors); with none it forks per launch. Spares never outlive the server."""
    launcher = env.process_launcher()
    launcher["config"] |= {"fork_server": True, "fork_server_spares": spares}
    env.configure(run_launcher=launcher)
    running = await env.start()
    out = env.tmp / "probe.txt"
    step = 'echo "$PROBE $(pwd)" > "$OUT"; sleep 600'
    run_id = await env.submit([{"key": "a", "command": ["sh", "-c", step]}], env={"PROBE": "handed", "OUT": str(out)})
    await env.wait_status(run_id, "STARTED")
    worker = (await env.handle(run_id))["pid"]
    server = _ppid(worker)
    assert "runherd.worker.forkserver" in _cmdline(server)
    await eventually(lambda: out.exists() and _text(out).startswith("handed "), timeout=15, what="the step ran")
    assert _text(out) == f"handed {os.getcwd()}"  # the launch's env and cwd, not the spare's
    assert os.getsid(worker) == worker  # a session (and process group) of its own

    def spares_ready() -> list[set[int]] | None:
        others = _children(server) - {worker}
        return [others] if len(others) == spares else None  # a list: no spares is an answer too

    [ready] = await eventually(spares_ready, timeout=15, what=f"{spares} spares forked ahead")
    assert all(os.getsid(p) == p for p in ready)
    await running.close()
    env.running.remove(running)
    await eventually(lambda: not any(Path(f"/proc/{p}").exists() for p in ready), timeout=15, what="spares gone")
