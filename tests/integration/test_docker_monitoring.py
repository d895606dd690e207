"""Issue 3's monitoring scenarios on the Docker launcher: real engine, RabbitMQ and PostgreSQL.

Each worker is `runherd worker` in a container of the base image (scripts/ci/dockerd.sh), with the
interpreter, the venv and the checkout bind-mounted read-only at their host paths and the test's
tmp dir read-write (the steps' side effects land there). Skipped, with the reason, when no Docker
engine answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiodocker
import pytest
from aiodocker.exceptions import DockerError

from runherd import config
from tests.harness import PYTHON, Env, eventually
from tests.launchers.docker_fixtures import (
    launcher_config,
    remove_session_containers,
    worker_binds,
)


@pytest.fixture
def engine(docker_engine: aiodocker.Docker) -> aiodocker.Docker:
    """The engine, playing the operator (docker kill, docker inspect)."""
    return docker_engine


@pytest.fixture
async def denv(env: Env, engine: aiodocker.Docker) -> AsyncIterator[Env]:
    """The test's env; afterwards the services stop first, then its containers are removed."""
    yield env
    await env.stop_all()
    await remove_session_containers(engine)


def use_docker(env: Env, *, run_monitoring: dict[str, Any] | None = None, **launcher: Any) -> None:
    """Configure the services with the Docker launcher running `runherd worker` containers."""
    tmp = str(env.tmp)
    docker = launcher_config(
        **{"command": [PYTHON, "-m", "runherd.cli", "worker"], "volumes": [*worker_binds(), f"{tmp}:{tmp}"], **launcher}
    )
    cfg = env.configure(run_monitoring=run_monitoring or {})
    # The whole section: the harness's process launcher defaults must not be merged into it.
    env.cfg = replace(
        cfg, run_launcher=config.from_mapping({"run_launcher": {"name": "docker", "config": docker}}).run_launcher
    )


async def inspect(engine: aiodocker.Docker, container_id: str) -> dict[str, Any] | None:
    """The container's State, or None once it has been removed."""
    try:
        return (await engine.containers.container(container_id).show())["State"]
    except DockerError as exc:
        if exc.status == 404:
            return None
        raise


async def events_of(env: Env, run_id: str, type_: str) -> list[dict[str, Any]]:
    return [e for e in await env.events(run_id) if e["type"] == type_]


def lines(path: Any) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


async def test_docker_kill_mid_run_resumes_without_rerunning_completed_steps(
    denv: Env, engine: aiodocker.Docker
) -> None:
    env = denv
    use_docker(env)
    await env.start()
    effects, started = env.tmp / "effects", env.tmp / "step2-started"
    run_id = await env.submit(
        [
            {"key": "one", "command": ["sh", "-c", f"echo one >> {effects}"]},
            {
                "key": "two",
                "command": [
                    "sh",
                    "-c",
                    f'echo two >> {effects}; if [ "$RUNHERD_ATTEMPT" = 1 ]; then touch {started}; sleep 600; fi',
                ],
                "deps": ["one"],
            },
            {"key": "three", "command": ["sh", "-c", f"echo three >> {effects}"], "deps": ["two"]},
        ]
    )
    await eventually(started.exists, timeout=30, what="step two to start in the container")
    first = await env.handle(run_id, attempt=1)
    assert first["launcher"] == "docker" and first["container_id"]
    await engine.containers.container(first["container_id"]).kill(signal="SIGKILL")

    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert (run["status"], run["attempt"]) == ("SUCCESS", 2), run["reason"]
    assert lines(effects).count("one") == 1, lines(effects)  # the completed step did not run again
    assert lines(effects).count("two") == 2 and lines(effects).count("three") == 1
    [exited] = [e for e in await events_of(env, run_id, "WORKER_EXITED") if e["attempt"] == 1]
    assert "SIGKILL" in exited["message"] and exited["data"]["exit_code"] == 137
    [resumed] = await events_of(env, run_id, "RUN_RESUMED")
    assert "resume attempt 1 of 3" in resumed["message"]
    second = await env.handle(run_id, attempt=2)
    assert second["container_id"] != first["container_id"]
    state = await inspect(engine, first["container_id"])
    assert state is not None and not state["Running"] and state["ExitCode"] == 137


async def test_container_over_its_memory_limit_is_logged_as_oomkilled(denv: Env, engine: aiodocker.Docker) -> None:
    env = denv
    use_docker(env, memory="128m")
    await env.start()
    # bytes * n writes every page, so the memory is really used.
    run_id = await env.submit([{"key": "hog", "command": [PYTHON, "-c", "b = b'x' * (600 << 20)"]}])

    run = await env.wait_status(run_id, "FAILURE", "SUCCESS", timeout=30)
    assert run["status"] == "FAILURE"
    [exited] = await eventually(lambda: events_of(env, run_id, "WORKER_EXITED"), what="the worker's exit")
    assert exited["data"]["reason"] == "OOMKilled"
    assert "OOMKilled" in exited["message"]
    assert "exceeding its memory limit" in exited["data"]["detail"]
    state = await inspect(engine, (await env.handle(run_id))["container_id"])
    assert state is not None and state["OOMKilled"] is True


async def test_stuck_starting_container_fails_the_run_and_is_removed(denv: Env, engine: aiodocker.Docker) -> None:
    env = denv
    # A worker that never reports; its container is removed once its exit is recorded.
    use_docker(env, run_monitoring={"start_timeout_seconds": 2}, command=["sleep", "600"], remove_after_exit=True)
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["true"]}])
    handle = await env.handle(run_id)

    run = await env.wait_status(run_id, "FAILURE", timeout=30)
    assert "did not start within 2 s" in run["reason"]
    await eventually(lambda: _removed(engine, handle["container_id"]), timeout=20, what="the container removed")
    await eventually(lambda: _terminated(env, run_id, "start timeout"), what="the termination in the event log")


async def test_max_runtime_fails_the_run_and_stops_the_container(denv: Env, engine: aiodocker.Docker) -> None:
    env = denv
    use_docker(env)
    await env.start()
    run_id = await env.submit([{"key": "a", "command": ["sleep", "600"]}], tags={"runherd/max_runtime": 2})
    handle = await env.handle(run_id)

    run = await env.wait_status(run_id, "FAILURE", timeout=30)
    assert run["reason"] == "exceeded max runtime of 2 s"

    async def stopped() -> bool:
        state = await inspect(engine, handle["container_id"])
        return state is not None and not state["Running"]

    await eventually(stopped, timeout=20, what="the container stopped")
    await eventually(lambda: _terminated(env, run_id, "exceeded max runtime"), what="the termination in the event log")


async def _removed(engine: aiodocker.Docker, container_id: str) -> bool:
    return await inspect(engine, container_id) is None


async def _terminated(env: Env, run_id: str, why: str) -> bool:
    # Other terminations may be logged too (the worker's late events are refused and it is fenced).
    return any(why in e["message"] for e in await events_of(env, run_id, "WORKER_TERMINATED"))
