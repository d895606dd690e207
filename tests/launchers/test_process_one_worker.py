"""Issue 8 items 4 and 9: one worker per attempt on the process launcher, bounded logs and maps.

"Kill the launcher between launch and record" is done for real: a launcher in a child process
starts the worker and is SIGKILLed before anything records the handle; a new launcher then
launches the same attempt, as the launch loop does once the claim's lease has run out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runherd.launchers import process
from runherd.launchers.base import HealthStatus, WorkerRun
from runherd.launchers.process import ProcessLauncher, read_record, record_self, start_time
from tests.harness import eventually, pids_alive

PY = sys.executable
MARK = "RUNHERD_TEST_MARK"

# A launcher process that starts the worker, prints its pid, and waits to be killed.
LAUNCH_AND_HANG = """
import asyncio, sys
from runherd.launchers.base import WorkerRun
from runherd.launchers.process import ProcessLauncher
async def main():
    launcher = ProcessLauncher({"log_dir": sys.argv[1]})
    env = {"RUNHERD_TEST_MARK": sys.argv[2]}
    run = WorkerRun(run_id=sys.argv[2], attempt=1, job="j", env=env, command=["sleep", "60"])
    handle = await launcher.launch(run)
    print(handle["pid"], flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def workers_of(mark: str) -> list[int]:
    """Every process carrying the attempt's mark in its environment."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"{MARK}={mark}".encode() in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


async def workers_settled(mark: str, count: int) -> list[int]:
    """``workers_of`` once it finds ``count`` workers: a worker whose launch has just returned may
    still be inside execve, its environment unreadable for a moment on a busy machine."""

    def found() -> list[int] | None:
        workers = workers_of(mark)
        return workers if len(workers) == count else None

    return await eventually(found, timeout=10, what=f"{count} worker(s) of {mark}")


def run_of(run_id: str, command: list[str], attempt: int = 1) -> WorkerRun:
    return WorkerRun(run_id=run_id, attempt=attempt, job="j", env={MARK: run_id}, command=command)


async def test_a_launcher_killed_before_recording_leaves_one_worker_which_is_adopted(tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    child = subprocess.Popen([PY, "-c", LAUNCH_AND_HANG, str(tmp_path), run_id], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        first_pid = int(await asyncio.to_thread(child.stdout.readline))
        child.kill()  # the launcher dies: nothing recorded the worker's handle
        child.wait(10)
        assert pids_alive([first_pid])

        launcher = ProcessLauncher({"log_dir": str(tmp_path)})
        handle = await launcher.launch(run_of(run_id, ["sleep", "60"]))
        assert handle["pid"] == first_pid  # adopted, not started again
        assert handle["start_time"] == start_time(first_pid)
        assert workers_of(run_id) == [first_pid]
        # The adopted worker is fenceable through its handle, and its exit is reported.
        assert (await launcher.check_health(handle)).status is HealthStatus.RUNNING
        assert await launcher.terminate(handle, grace_seconds=0) is True
        exit_ = await asyncio.wait_for(anext(launcher.watch()), 10)
        assert (exit_.run_id, exit_.attempt) == (run_id, 1)
        assert workers_of(run_id) == []
        await launcher.close()
    finally:
        child.kill()
        for pid in workers_of(run_id):
            os.kill(pid, signal.SIGKILL)


async def test_concurrent_launches_of_one_attempt_start_one_worker(tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    first, second = ProcessLauncher({"log_dir": str(tmp_path)}), ProcessLauncher({"log_dir": str(tmp_path)})
    try:
        handles = await asyncio.gather(
            first.launch(run_of(run_id, ["sleep", "60"])),
            second.launch(run_of(run_id, ["sleep", "60"])),
            first.launch(run_of(run_id, ["sleep", "60"])),
        )
        assert len({h["pid"] for h in handles}) == 1
        assert await workers_settled(run_id, 1) == [handles[0]["pid"]]
        # Another attempt of the run is another worker.
        other = await first.launch(run_of(run_id, ["sleep", "60"], attempt=2))
        assert other["pid"] != handles[0]["pid"]
        assert sorted(await workers_settled(run_id, 2)) == sorted([handles[0]["pid"], other["pid"]])
        for handle in (handles[0], other):
            await first.terminate(handle, grace_seconds=0)
    finally:
        await first.close()
        await second.close()


async def test_an_attempt_whose_worker_exited_is_never_started_again(tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    ran = tmp_path / "ran.txt"
    command = ["sh", "-c", f"echo ran >> {ran}"]
    launcher = ProcessLauncher({"log_dir": str(tmp_path)})
    handle = await launcher.launch(run_of(run_id, command))
    assert (await asyncio.wait_for(anext(launcher.watch()), 10)).exit_code == 0
    restarted = ProcessLauncher({"log_dir": str(tmp_path)})
    again = await restarted.launch(run_of(run_id, command))
    assert again["pid"] == handle["pid"]  # the old worker's handle: nothing new ran
    exit_ = await asyncio.wait_for(anext(restarted.watch()), 10)
    assert exit_.exit_code is None and "exit code unknown" in (exit_.message or "")
    assert (await restarted.check_health(again)).status is HealthStatus.NOT_FOUND
    assert await asyncio.to_thread(ran.read_text) == "ran\n"  # it ran once
    await launcher.close()
    await restarted.close()


def test_the_worker_records_itself_when_the_launcher_could_not(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    record = tmp_path / "attempt-1.worker"
    record.touch(mode=0o600)
    monkeypatch.setenv(process.RECORD_ENV, str(record))
    record_self("w-self")
    fd = os.open(record, os.O_RDONLY)
    try:
        written = read_record(fd)
    finally:
        os.close(fd)
    leader = os.getpgrp()
    assert written == {
        "pid": leader,
        "start_time": start_time(leader),
        "host": os.uname().nodename,
        "worker_id": "w-self",
    }
    record_self("w-other")  # a record is never overwritten by the worker
    fd = os.open(record, os.O_RDONLY)
    try:
        assert read_record(fd) == written
    finally:
        os.close(fd)


async def test_reaped_children_leave_a_bounded_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "MAX_EXITS_KEPT", 3)
    launcher = ProcessLauncher({"log_dir": str(tmp_path)})
    exits = launcher.watch()
    handles = [await launcher.launch(run_of(str(uuid.uuid4()), ["true"])) for _ in range(6)]
    for _ in handles:
        await asyncio.wait_for(anext(exits), 10)
    assert launcher._children == {} and len(launcher._exited) == 3
    # The newest exits still answer with their code; the oldest are simply gone.
    assert (await launcher.check_health(handles[-1])).status is HealthStatus.SUCCESS
    assert (await launcher.check_health(handles[0])).status is HealthStatus.NOT_FOUND
    await launcher.close()


async def test_the_plan_file_is_private(tmp_path: Path) -> None:
    launcher = ProcessLauncher({"log_dir": str(tmp_path)})
    run = WorkerRun(run_id=str(uuid.uuid4()), attempt=1, job="j", env={}, command=["sleep", "30"], plan='{"v": 1}')
    handle = await launcher.launch(run)
    plan_file = Path(handle["log_path"]).with_name("attempt-1.plan.json")
    assert plan_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / run.run_id / "attempt-1.worker").stat().st_mode & 0o777 == 0o600
    await launcher.terminate(handle, grace_seconds=0)
    await eventually(lambda: not plan_file.exists(), what="the plan removed with its worker")
    await launcher.close()
