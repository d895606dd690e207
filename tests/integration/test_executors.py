"""Issue 11, item 1: the executors under the monitoring scenarios (SIGKILL, hang, max runtime,
cancel). ``multiprocess`` is the default, which tests/integration/test_monitoring.py covers; here
``in_process`` (a call step running inside the worker) and ``launcher`` (each step in its own
process group, outliving the worker, adopted by a resumed attempt), and at the end the cells of the
matrix (executor x scenario x launcher) that no other test covers."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.harness import ROOT, Env, eventually, pids_alive
from tests.integration import test_launch_failures

IN_PROCESS = {"runherd/executor": "in_process"}


def _marks(path: os.PathLike[str]) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _quick_hang_detection(env: Env) -> None:
    env.configure(run_monitoring={"heartbeat_timeout_seconds": 3}, run_launcher=env.process_launcher(grace=1))


async def _blocked(env: Env, tags: dict[str, str]) -> tuple[str, dict[str, Any]]:
    mark = env.tmp / "mark"
    run_id = await env.submit(
        [
            {"key": "where", "call": "tests.fixtures.steps:where"},
            {"key": "block", "call": "tests.fixtures.steps:block_first_attempt", "deps": ["where"]},
        ],
        tags=tags,
        env={"RUNHERD_TEST_MARK": str(mark), "PYTHONPATH": str(os.getcwd())},
    )
    await eventually(lambda: bool(_marks(mark)), what="the blocking step to start")
    return run_id, await env.handle(run_id, attempt=1)


@pytest.mark.parametrize("scenario", ["sigkill", "hang"])
async def test_in_process_worker_crash_or_hang_resumes(env: Env, scenario: str) -> None:
    _quick_hang_detection(env)
    await env.start()
    run_id, handle = await _blocked(env, IN_PROCESS)
    assert _marks(env.tmp / "mark") == [handle["pid"]]  # the call ran in the worker's own process
    os.kill(int(handle["pid"]), signal.SIGKILL if scenario == "sigkill" else signal.SIGSTOP)
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS" and run["attempt"] == 2, run["reason"]
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert steps["where"]["attempt"] == 1 and steps["where"]["output"]["pid"] == handle["pid"]
    assert steps["block"]["attempt"] == 2
    starts = [e for e in await env.events(run_id) if e["type"] == "RUN_START"]
    assert {e["data"]["executor"] for e in starts} == {"in_process"} and starts[0]["data"]["max_concurrent"] == 1
    await eventually(lambda: not pids_alive([int(handle["pid"])]), what="the old worker gone")


@pytest.mark.parametrize("scenario", ["max_runtime", "cancel"])
async def test_in_process_max_runtime_and_cancel_stop_the_worker(env: Env, scenario: str) -> None:
    await env.start()
    tags = {**IN_PROCESS, **({"runherd/max_runtime": "2"} if scenario == "max_runtime" else {})}
    run_id, handle = await _blocked(env, tags)
    if scenario == "cancel":
        await env.cancel(run_id)
    run = await env.wait_status(run_id, "FAILURE", "CANCELED", "SUCCESS")
    assert run["status"] == ("FAILURE" if scenario == "max_runtime" else "CANCELED"), run["reason"]
    await eventually(lambda: not pids_alive([int(handle["pid"])]), what="the worker and its step gone")


# --- launcher: each step its own process group, outliving the worker ------------------------------

LAUNCHER = {"runherd/executor": "launcher"}


def _gated(effects: os.PathLike[str], gate: os.PathLike[str]) -> list[str]:
    """Notes the attempt it started in, waits for the test's gate file, notes that it finished."""
    return [
        "sh",
        "-c",
        f'echo "start$RUNHERD_ATTEMPT" >> {effects}; '
        f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done >> {effects}",
    ]


def _lines(path: os.PathLike[str]) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


async def _step_handle(env: Env, run_id: str, attempt: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        for e in await env.events(run_id):
            if e["type"] == "STEP_START" and e["attempt"] == attempt and e["data"].get("handle"):
                return dict(e["data"]["handle"])
        return None

    return await eventually(check, what=f"the step's handle in attempt {attempt}")


async def test_launcher_a_resumed_attempt_adopts_the_step_still_running_after_a_sigkill(env: Env) -> None:
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=LAUNCHER)
    step = await _step_handle(env, run_id, 1)
    worker = await env.handle(run_id, attempt=1)
    assert step["pgid"] != worker["pid"] and not step["adopted"]
    os.kill(worker["pid"], signal.SIGKILL)
    adopted = await _step_handle(env, run_id, 2)
    assert adopted["pid"] == step["pid"] and adopted["adopted"]  # the same group, not started again
    assert pids_alive([step["pid"]])
    gate.touch()
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE")
    assert run["status"] == "SUCCESS" and run["attempt"] == 2, run["reason"]
    assert _lines(effects) == ["start1", "done"]  # ran once, across two workers


async def test_launcher_a_step_orphaned_by_a_crash_with_no_resume_left_stops_itself(env: Env) -> None:
    env.configure(run_monitoring={"max_resume_run_attempts": 0})
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    run_id = await env.submit(
        [{"key": "long", "command": _gated(effects, gate)}],
        tags=LAUNCHER,
        env={"RUNHERD_STEP_ORPHAN_GRACE_SECONDS": "1"},
    )
    step = await _step_handle(env, run_id, 1)
    await eventually(lambda: _lines(effects) == ["start1"], what="the step running")
    os.kill((await env.handle(run_id, attempt=1))["pid"], signal.SIGKILL)
    run = await env.wait_status(run_id, "FAILURE", "SUCCESS")
    assert "resume is off" in run["reason"]
    await eventually(lambda: not pids_alive([step["pid"]]), what="the orphaned step group gone")
    assert _lines(effects) == ["start1"]


@pytest.mark.parametrize("scenario", ["cancel", "max_runtime", "hang"])
async def test_launcher_cancel_max_runtime_and_hang_stop_the_steps_group(env: Env, scenario: str) -> None:
    _quick_hang_detection(env)
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    tags = {**LAUNCHER, **({"runherd/max_runtime": "2"} if scenario == "max_runtime" else {})}
    run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=tags)
    step = await _step_handle(env, run_id, 1)
    worker = await env.handle(run_id, attempt=1)
    await eventually(lambda: _lines(effects) == ["start1"], what="the step running")
    if scenario == "cancel":
        await env.cancel(run_id)
    elif scenario == "hang":
        os.kill(worker["pid"], signal.SIGSTOP)
    if scenario == "hang":
        # The hung worker is terminated with the steps it owned; a resumed attempt that came first
        # has adopted the step (it owns it then, and it runs on), else starts it anew.
        second = await _step_handle(env, run_id, 2)
        if second["adopted"]:
            assert second["pid"] == step["pid"]
        else:
            await eventually(lambda: not pids_alive([step["pid"]]), what="the hung worker's step gone")
        gate.touch()
        run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
        assert run["status"] == "SUCCESS" and run["attempt"] == 2, run["reason"]
        assert _lines(effects) == (["start1", "done"] if second["adopted"] else ["start1", "start2", "done"])
        await eventually(lambda: not pids_alive([step["pid"], second["pid"]]), what="no step group left")
        return
    run = await env.wait_status(run_id, "CANCELED", "FAILURE", "SUCCESS")
    assert run["status"] == ("CANCELED" if scenario == "cancel" else "FAILURE"), run["reason"]
    await eventually(lambda: not pids_alive([step["pid"], worker["pid"]]), what="the worker and the step's group gone")
    assert _lines(effects) == ["start1"]


# --- on Docker: the executor runs inside the worker's container ------------------------------------


async def test_in_process_on_docker_a_killed_container_resumes_and_cancel_stops_it(
    env: Env, docker_engine: Any
) -> None:
    from tests.integration.test_docker_monitoring import inspect, use_docker
    from tests.launchers.docker_fixtures import remove_session_containers

    use_docker(env)
    try:
        await env.start()
        run_id, first = await _blocked(env, IN_PROCESS)
        await docker_engine.containers.container(first["container_id"]).kill(signal="SIGKILL")
        run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
        assert (run["status"], run["attempt"]) == ("SUCCESS", 2), run["reason"]
        steps = {s["step_key"]: s for s in run["steps_status"]}
        assert steps["where"]["attempt"] == 1 and steps["block"]["attempt"] == 2
        # cancel: the blocking call runs in the worker, so the container stops with it
        mark = env.tmp / "mark"
        mark.unlink()
        second, handle = await _blocked(env, IN_PROCESS)
        await env.cancel(second)
        assert (await env.wait_status(second, "CANCELED", "FAILURE", "SUCCESS", timeout=30))["status"] == "CANCELED"

        async def stopped() -> bool:
            state = await inspect(docker_engine, handle["container_id"])
            return state is None or not state["Running"]

        await eventually(stopped, timeout=20, what="the container stopped")
    finally:
        await env.stop_all()
        await remove_session_containers(docker_engine)


# --- launcher on Docker: each step try in a container of its own, started by the worker -----------


async def _step_containers(engine: Any, run_id: str) -> list[dict[str, Any]]:
    """The run's step containers, as the engine lists them (found by label, as terminate does)."""
    from runherd.launchers.docker.spec import LABEL_RUN_ID
    from runherd.launchers.docker.steps import LABEL_STEP

    filters = json.dumps({"label": [f"{LABEL_RUN_ID}={run_id}", LABEL_STEP]})
    return [c._container for c in await engine.containers.list(all=True, filters=filters)]


async def _running(engine: Any, container_id: str) -> bool:
    from tests.integration.test_docker_monitoring import inspect

    state = await inspect(engine, container_id)
    return state is not None and bool(state["Running"])


@pytest.fixture
async def denv(env: Env, docker_engine: Any) -> AsyncIterator[Env]:
    """The env on the Docker launcher; afterwards the services stop, then the containers go."""
    from tests.integration.test_docker_monitoring import use_docker
    from tests.launchers.docker_fixtures import remove_session_containers

    use_docker(env, run_monitoring={"heartbeat_timeout_seconds": 3})
    yield env
    await env.stop_all()
    await remove_session_containers(docker_engine)


async def test_launcher_on_docker_runs_each_step_in_its_own_container(denv: Env, docker_engine: Any) -> None:
    env = denv
    await env.start()
    run_id = await env.submit(
        [
            {"key": "numbers", "call": "tests.fixtures.steps:numbers"},
            {"key": "total", "call": "tests.fixtures.steps:total", "deps": ["numbers"]},
        ],
        tags=LAUNCHER,
    )
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS", run["reason"]
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert steps["total"]["output"] == {"sum": 10}  # the inputs went in, the output came out
    worker = await env.handle(run_id, attempt=1)
    containers = await _step_containers(docker_engine, run_id)
    by_step = {c["Labels"]["runherd.step"]: c for c in containers}
    assert sorted(by_step) == ["numbers", "total"] and len(containers) == 2  # one per step
    assert {c["Id"] for c in containers}.isdisjoint({worker["container_id"]})
    assert all(c["Labels"]["runherd.attempt"] == "1" and c["Labels"]["runherd.step_try"] == "1" for c in containers)
    starts = {e["step_key"]: e["data"]["handle"] for e in await env.events(run_id) if e["type"] == "STEP_START"}
    assert {k: h["container_id"] for k, h in starts.items()} == {k: c["Id"] for k, c in by_step.items()}
    env_of = (await docker_engine.containers.container(by_step["total"]["Id"]).show())["Config"]["Env"]
    assert not any(v.startswith(("RUNHERD_DOCKER_URL=", "RUNHERD_PLAN")) for v in env_of)  # the worker's alone


async def test_launcher_on_docker_a_resumed_attempt_adopts_the_step_container_after_a_kill(
    denv: Env, docker_engine: Any
) -> None:
    env = denv
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=LAUNCHER)
    step = await _step_handle(env, run_id, 1)
    await eventually(lambda: _lines(effects) == ["start1"], timeout=20, what="the step running")
    worker = await env.handle(run_id, attempt=1)
    await docker_engine.containers.container(worker["container_id"]).kill(signal="SIGKILL")
    adopted = await _step_handle(env, run_id, 2)
    assert adopted["container_id"] == step["container_id"] and adopted["adopted"]  # not started again
    assert await _running(docker_engine, step["container_id"])
    gate.touch()
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS" and run["attempt"] == 2, run["reason"]
    assert _lines(effects) == ["start1", "done"]  # ran once, across two workers
    assert len(await _step_containers(docker_engine, run_id)) == 1


async def test_launcher_on_docker_a_step_orphaned_by_a_crash_with_no_resume_left_is_killed(
    env: Env, docker_engine: Any
) -> None:
    from tests.integration.test_docker_monitoring import use_docker
    from tests.launchers.docker_fixtures import remove_session_containers

    use_docker(env, run_monitoring={"max_resume_run_attempts": 0}, step_orphan_grace_seconds=1)
    try:
        await env.start()
        effects, gate = env.tmp / "effects", env.tmp / "gate"
        run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=LAUNCHER)
        step = await _step_handle(env, run_id, 1)
        await eventually(lambda: _lines(effects) == ["start1"], timeout=20, what="the step running")
        worker = await env.handle(run_id, attempt=1)
        await docker_engine.containers.container(worker["container_id"]).kill(signal="SIGKILL")
        run = await env.wait_status(run_id, "FAILURE", "SUCCESS", timeout=30)
        assert "resume is off" in run["reason"]

        async def stopped() -> bool:
            return not await _running(docker_engine, step["container_id"])

        await eventually(stopped, timeout=20, what="the orphaned step container killed by the launcher")
        assert _lines(effects) == ["start1"]
    finally:
        await env.stop_all()
        await remove_session_containers(docker_engine)


@pytest.mark.parametrize("scenario", ["cancel", "max_runtime", "hang", "cancel_stopped_worker"])
async def test_launcher_on_docker_cancel_max_runtime_and_hang_stop_the_step_container(
    denv: Env, docker_engine: Any, scenario: str
) -> None:
    env = denv
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    tags = {**LAUNCHER, **({"runherd/max_runtime": "3"} if scenario == "max_runtime" else {})}
    run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=tags)
    step = await _step_handle(env, run_id, 1)
    await eventually(lambda: _lines(effects) == ["start1"], timeout=20, what="the step running")
    if scenario == "cancel":
        await env.cancel(run_id)
    if scenario == "cancel_stopped_worker":
        # The worker cannot stop its step: the launcher's terminate finds the step by label.
        worker = await env.handle(run_id, attempt=1)
        await docker_engine.containers.container(worker["container_id"]).kill(signal="SIGSTOP")
        await env.cancel(run_id)
    if scenario == "hang":
        # A stopped worker cannot stop its steps: the launcher's terminate of the hung worker
        # kills its step container (found by label), unless a resumed attempt came first and
        # adopted it (it owns it then, and it runs on).
        worker = await env.handle(run_id, attempt=1)
        await docker_engine.containers.container(worker["container_id"]).kill(signal="SIGSTOP")
        second = await _step_handle(env, run_id, 2)
        if second["adopted"]:
            assert second["container_id"] == step["container_id"]
        else:
            assert not await _running(docker_engine, step["container_id"])
        gate.touch()
        run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
        assert run["status"] == "SUCCESS" and run["attempt"] == 2, run["reason"]
        assert _lines(effects) == (["start1", "done"] if second["adopted"] else ["start1", "start2", "done"])
        return
    run = await env.wait_status(run_id, "CANCELED", "FAILURE", "SUCCESS", timeout=30)
    assert run["status"] == ("FAILURE" if scenario == "max_runtime" else "CANCELED"), run["reason"]

    async def stopped() -> bool:
        return not await _running(docker_engine, step["container_id"])

    await eventually(stopped, timeout=20, what="the step container stopped")
    assert _lines(effects) == ["start1"]


# --- on Kubernetes (the API-server emulator; its kubelet runs each pod as a local process) ------------


k8s = test_launch_failures.k8s  # the fixture: the emulator, and the services launching Jobs on it


@pytest.mark.usefixtures("k8s")
async def test_in_process_on_kubernetes_a_killed_worker_resumes_and_cancel_stops_it(env: Env) -> None:
    await env.start()
    run_id, _ = await _blocked(env, IN_PROCESS)

    async def first_start() -> dict[str, Any] | None:
        return next((e for e in await env.events(run_id) if e["type"] == "RUN_START"), None)

    start = await eventually(first_start, what="the RUN_START")
    assert start["data"]["executor"] == "in_process"
    os.kill(start["data"]["pid"], signal.SIGKILL)  # the pod's container process: the worker
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert (run["status"], run["attempt"]) == ("SUCCESS", 2), run["reason"]
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert steps["where"]["attempt"] == 1 and steps["block"]["attempt"] == 2
    (env.tmp / "mark").unlink()
    second, _ = await _blocked(env, IN_PROCESS)

    async def worker_pid() -> int | None:
        return next((e["data"]["pid"] for e in await env.events(second) if e["type"] == "RUN_START"), None)

    worker = await eventually(worker_pid, what="the second run's RUN_START")
    await env.cancel(second)
    assert (await env.wait_status(second, "CANCELED", "FAILURE", "SUCCESS", timeout=30))["status"] == "CANCELED"
    await eventually(lambda: not pids_alive([worker]), what="the pod's worker gone")


# --- launcher on Kubernetes: each step try in a Job of its own, created by the worker ---------------


def _step_jobs(emulator: Any) -> list[dict[str, Any]]:
    from runherd.launchers.kubernetes.steps import LABEL_STEP

    return [j for j in emulator.jobs() if LABEL_STEP in (j["metadata"].get("labels") or {})]


def _step_job_running(emulator: Any, name: str) -> bool:
    runtime = emulator.runtime(name)
    return runtime is not None and runtime.proc is not None and runtime.proc.returncode is None


async def _worker_pid(env: Env, run_id: str, attempt: int) -> int:
    async def check() -> int | None:
        for e in await env.events(run_id):
            if e["type"] == "RUN_START" and e["attempt"] == attempt:
                return int(e["data"]["pid"])
        return None

    return await eventually(check, what=f"the RUN_START of attempt {attempt}")


async def test_launcher_on_kubernetes_runs_each_step_in_its_own_job(env: Env, k8s: Any) -> None:
    await env.start()
    run_id = await env.submit(
        [
            {"key": "numbers", "call": "tests.fixtures.steps:numbers"},
            {"key": "total", "call": "tests.fixtures.steps:total", "deps": ["numbers"]},
        ],
        tags=LAUNCHER,
    )
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS", run["reason"]
    assert {s["step_key"]: s for s in run["steps_status"]}["total"]["output"] == {"sum": 10}
    jobs = {j["metadata"]["annotations"]["runherd/step_key"]: j for j in _step_jobs(k8s)}
    assert sorted(jobs) == ["numbers", "total"] and len(_step_jobs(k8s)) == 2  # one Job per step
    for job in jobs.values():
        labels = job["metadata"]["labels"]
        assert (labels["runherd/attempt"], labels["runherd/step_try"]) == ("1", "1")
        assert job["metadata"]["annotations"]["runherd/run_id"] == run_id
        env_of = {v["name"] for v in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "RUNHERD_PLAN_FILE" not in env_of and "RUNHERD_AMQP_URL" not in env_of  # the worker's alone
    starts = {e["step_key"]: e["data"]["handle"] for e in await env.events(run_id) if e["type"] == "STEP_START"}
    assert {k: h["job_name"] for k, h in starts.items()} == {k: j["metadata"]["name"] for k, j in jobs.items()}


async def test_launcher_on_kubernetes_a_resumed_attempt_adopts_the_step_job_after_a_kill(env: Env, k8s: Any) -> None:
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=LAUNCHER)
    step = await _step_handle(env, run_id, 1)
    await eventually(lambda: _lines(effects) == ["start1"], timeout=20, what="the step running")
    os.kill(await _worker_pid(env, run_id, 1), signal.SIGKILL)  # the worker pod's process
    adopted = await _step_handle(env, run_id, 2)
    assert adopted["job_name"] == step["job_name"] and adopted["adopted"]  # not started again
    assert _step_job_running(k8s, step["job_name"])
    gate.touch()
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS" and run["attempt"] == 2, run["reason"]
    assert _lines(effects) == ["start1", "done"]  # ran once, across two workers
    assert len(_step_jobs(k8s)) == 1


@pytest.mark.parametrize("scenario", ["cancel", "max_runtime", "cancel_stopped_worker"])
async def test_launcher_on_kubernetes_cancel_and_max_runtime_stop_the_step_job(
    env: Env, k8s: Any, scenario: str
) -> None:
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    tags = {**LAUNCHER, **({"runherd/max_runtime": "3"} if scenario == "max_runtime" else {})}
    run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=tags)
    step = await _step_handle(env, run_id, 1)
    await eventually(lambda: _lines(effects) == ["start1"], timeout=20, what="the step running")
    if scenario == "cancel_stopped_worker":
        # The worker cannot stop its step: the launcher's terminate finds the step Job by label.
        os.kill(await _worker_pid(env, run_id, 1), signal.SIGSTOP)
    if scenario != "max_runtime":
        await env.cancel(run_id)
    run = await env.wait_status(run_id, "CANCELED", "FAILURE", "SUCCESS", timeout=30)
    assert run["status"] == ("FAILURE" if scenario == "max_runtime" else "CANCELED"), run["reason"]
    assert run["attempt"] == 1  # the Job's deadline, if it fired first, is no crash to resume
    await eventually(lambda: not _step_job_running(k8s, step["job_name"]), timeout=20, what="the step Job stopped")
    assert _lines(effects) == ["start1"]


async def test_launcher_on_kubernetes_a_step_orphaned_by_a_crash_with_no_resume_left_is_deleted(
    env: Env, k8s: Any
) -> None:
    from dataclasses import replace

    launcher = env.cfg.run_launcher
    env.cfg = replace(
        env.configure(run_monitoring={"max_resume_run_attempts": 0}),
        run_launcher=replace(launcher, config={**launcher.config, "step_orphan_grace_seconds": 1}),
    )
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    run_id = await env.submit([{"key": "long", "command": _gated(effects, gate)}], tags=LAUNCHER)
    step = await _step_handle(env, run_id, 1)
    await eventually(lambda: _lines(effects) == ["start1"], timeout=20, what="the step running")
    os.kill(await _worker_pid(env, run_id, 1), signal.SIGKILL)
    run = await env.wait_status(run_id, "FAILURE", "SUCCESS", timeout=30)
    assert "resume is off" in run["reason"]
    await eventually(lambda: not _step_job_running(k8s, step["job_name"]), timeout=20, what="the orphan deleted")
    assert _lines(effects) == ["start1"]


# --- the rest of the matrix: each executor under each scenario, on each launcher -------------------
#
# The cells the tests above, test_monitoring.py, test_run_path.py (multiprocess cancel) and
# test_docker_monitoring.py do not cover, run through one scenario: step ``one`` (a side effect to
# count) then ``two``, a call that notes its start and pid and, on attempt 1, waits for a gate file
# the test opens only when the launcher executor may have adopted it.

SCENARIOS = ("sigkill", "hang", "max_runtime", "cancel")
SignalWorker = Callable[[str, signal.Signals], Awaitable[None]]
Gone = Callable[[str, list[int]], Awaitable[bool]]


async def _matrix_case(env: Env, executor: str, scenario: str, signal_worker: SignalWorker, gone: Gone) -> None:
    """Runs one cell. ``signal_worker(run_id, sig)`` signals attempt 1's worker; ``gone(run_id,
    pids)`` says whether attempt 1's worker and the step processes of these pids are all gone."""
    effects, pids, gate = env.tmp / "effects", env.tmp / "pids", env.tmp / "gate"
    tags = {"runherd/executor": executor, **({"runherd/max_runtime": "3"} if scenario == "max_runtime" else {})}
    run_id = await env.submit(
        [
            {"key": "one", "command": ["sh", "-c", f"echo one >> {effects}"]},
            {"key": "two", "call": "tests.fixtures.steps:gated", "deps": ["one"]},
        ],
        tags=tags,
        env={
            "RUNHERD_TEST_EFFECTS": str(effects),
            "RUNHERD_TEST_PIDS": str(pids),
            "RUNHERD_TEST_GATE": str(gate),
            "PYTHONPATH": str(ROOT),
        },
    )
    await eventually(lambda: _lines(effects) == ["one", "start1"], timeout=20, what="step two running in attempt 1")
    if scenario == "cancel":
        await env.cancel(run_id)
    if scenario in ("sigkill", "hang"):
        await signal_worker(run_id, signal.SIGKILL if scenario == "sigkill" else signal.SIGSTOP)
    if scenario in ("max_runtime", "cancel"):
        run = await env.wait_status(run_id, "CANCELED", "FAILURE", "SUCCESS", timeout=30)
        if scenario == "cancel":
            assert run["status"] == "CANCELED", run["reason"]
        else:
            assert (run["status"], run["reason"]) == ("FAILURE", "exceeded max runtime of 3 s")
        assert run["attempt"] == 1  # not resumed on the way
        await eventually(lambda: gone(run_id, _ints(pids)), timeout=20, what="the worker and its step gone")
        assert _lines(effects) == ["one", "start1"]  # stopped, not finished
        return
    adopted = False
    if executor == "launcher":
        # A resumed attempt that came before the hung worker's terminate adopts the step (it runs
        # on, and finishes once the gate opens); else the terminate stopped it and it starts anew.
        adopted = bool((await _step_handle(env, run_id, 2))["adopted"])
        gate.touch()
    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert (run["status"], run["attempt"]) == ("SUCCESS", 2), run["reason"]
    steps = {s["step_key"]: s for s in run["steps_status"]}
    assert (steps["one"]["attempt"], steps["two"]["attempt"]) == (1, 2)
    [resumed] = [e for e in await env.events(run_id) if e["type"] == "RUN_RESUMED"]
    assert ("no heartbeat" in resumed["message"]) == (scenario == "hang"), resumed["message"]
    first = _ints(pids)[:1]
    await eventually(lambda: gone(run_id, first), timeout=20, what="attempt 1's worker and step gone")
    # One ran once; two ran again only if not adopted, and attempt 1's try never got past its gate.
    assert _lines(effects) == (["one", "start1", "done1"] if adopted else ["one", "start1", "start2", "done2"])


def _ints(path: os.PathLike[str]) -> list[int]:
    return [int(x) for x in _lines(path)]


DOCKER_GAPS = [
    ("in_process", "hang"),
    ("in_process", "max_runtime"),
    ("multiprocess", "hang"),
    ("multiprocess", "cancel"),
]


@pytest.mark.parametrize(("executor", "scenario"), DOCKER_GAPS)
async def test_executor_matrix_on_docker(denv: Env, docker_engine: Any, executor: str, scenario: str) -> None:
    """The worker's container is the worker: stopped, everything its steps ran in it is gone."""
    env = denv
    await env.start()

    async def signal_worker(run_id: str, sig: signal.Signals) -> None:
        worker = await env.handle(run_id, attempt=1)
        await docker_engine.containers.container(worker["container_id"]).kill(signal=sig.name)

    async def gone(run_id: str, pids: list[int]) -> bool:
        return not await _running(docker_engine, (await env.handle(run_id, attempt=1))["container_id"])

    await _matrix_case(env, executor, scenario, signal_worker, gone)


K8S_GAPS = [
    ("in_process", "hang"),
    ("in_process", "max_runtime"),
    *[("multiprocess", s) for s in SCENARIOS],
    ("launcher", "hang"),
]


@pytest.mark.parametrize(("executor", "scenario"), K8S_GAPS)
async def test_executor_matrix_on_kubernetes(env: Env, k8s: Any, executor: str, scenario: str) -> None:
    """The emulator's kubelet runs each pod as a local process: the worker's and its steps' pids
    are this host's, and a launcher-executor step's Job is looked at too."""
    from dataclasses import replace

    launcher = env.cfg.run_launcher
    env.cfg = replace(env.configure(run_monitoring={"heartbeat_timeout_seconds": 3}), run_launcher=launcher)
    await env.start()

    async def signal_worker(run_id: str, sig: signal.Signals) -> None:
        os.kill(await _worker_pid(env, run_id, 1), sig)

    async def gone(run_id: str, pids: list[int]) -> bool:
        if pids_alive([await _worker_pid(env, run_id, 1), *pids]):
            return False
        jobs = [j["metadata"]["name"] for j in _step_jobs(k8s) if j["metadata"]["labels"]["runherd/attempt"] == "1"]
        return not any(_step_job_running(k8s, name) for name in jobs)

    await _matrix_case(env, executor, scenario, signal_worker, gone)


async def test_on_kubernetes_a_worker_stopped_at_its_jobs_deadline_fails_the_run_and_its_step_jobs(
    env: Env, k8s: Any
) -> None:
    """The Job's activeDeadlineSeconds (the run's max runtime, counted from the Job's start) stops
    the worker: that is the max runtime, not a crash to resume; and the step Jobs go with it. The
    monitor's sweeps are off, so the deadline is what fires."""
    from dataclasses import replace

    launcher = env.cfg.run_launcher
    env.cfg = replace(env.configure(run_monitoring={"enabled": False}), run_launcher=launcher)
    await env.start()
    effects, gate = env.tmp / "effects", env.tmp / "gate"
    run_id = await env.submit(
        [{"key": "long", "command": _gated(effects, gate)}], tags={**LAUNCHER, "runherd/max_runtime": "2"}
    )
    step = await _step_handle(env, run_id, 1)
    run = await env.wait_status(run_id, "FAILURE", "SUCCESS", timeout=30)
    assert (run["status"], run["reason"], run["attempt"]) == ("FAILURE", "exceeded max runtime of 2 s", 1)
    [exited] = [e for e in await env.events(run_id) if e["type"] == "WORKER_EXITED"]
    assert exited["data"]["reason"] == "DeadlineExceeded"
    assert not [e for e in await env.events(run_id) if e["type"] == "RUN_RESUMED"]
    await eventually(lambda: not _step_job_running(k8s, step["job_name"]), timeout=10, what="the step Job deleted")
    assert _lines(effects) == ["start1"]
