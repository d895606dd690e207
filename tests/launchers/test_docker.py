"""DockerLauncher against the real engine: launch, exits, OOM, kill, terminate, logs, watch.

Needs a Docker engine (scripts/ci/dockerd.sh starts one and builds the base image); without one the
engine tests skip and only the configuration tests run. Every wait has a deadline of seconds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiodocker
import pytest

from runherd.errors import ConfigError, LaunchError
from runherd.launchers.base import Health, HealthStatus
from runherd.launchers.docker import DockerLauncher, build_container_spec, container_name
from tests.launchers.docker_fixtures import (
    BASE_IMAGE,
    PYTHON,
    ExitCollector,
    launcher_config,
    make_launcher,
    new_run,
    python_command,
    wait_until,
)

SLEEP = python_command("import time; print('sleeping', flush=True); time.sleep(60)")

LauncherFactory = Callable[..., Awaitable[tuple[DockerLauncher, ExitCollector]]]


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def engine(docker_engine: aiodocker.Docker) -> aiodocker.Docker:
    """The engine, playing the operator (docker kill, docker inspect)."""
    return docker_engine


@pytest.fixture
async def launch_env(engine: aiodocker.Docker) -> AsyncIterator[LauncherFactory]:
    """Builds launchers that each have a background watcher; closes them all afterwards."""
    made: list[tuple[DockerLauncher, ExitCollector]] = []

    async def make(**overrides: Any) -> tuple[DockerLauncher, ExitCollector]:
        launcher = await make_launcher(**overrides)
        collector = ExitCollector(launcher)
        made.append((launcher, collector))
        await wait_until(lambda: launcher.stream_connected, within=5, what="event stream")
        return launcher, collector

    yield make
    for launcher, collector in made:
        await collector.stop()
        await launcher.close()


async def inspect_state(engine: aiodocker.Docker, container_id: str) -> dict[str, Any]:
    return (await engine.containers.container(container_id).show())["State"]


async def health_becomes(
    launcher: DockerLauncher, handle: dict[str, Any], status: HealthStatus, within: float = 5
) -> Health:
    seen: list[Health] = []

    async def check() -> bool:
        seen.append(await launcher.check_health(handle))
        return seen[-1].status == status

    await wait_until(check, within=within, what=f"health {status}")
    return seen[-1]


# --------------------------------------------------------------------------------------------
# Exits seen by check_health and watch()


async def test_exit_zero_is_success(launch_env: LauncherFactory, engine: aiodocker.Docker) -> None:
    launcher, exits = await launch_env(env={"FROM_CONFIG": "config", "SHARED": "config"})
    run = new_run(
        python_command("import os; print('hello from the worker', os.environ['FROM_CONFIG'], os.environ['SHARED'])"),
        env={"SHARED": "run"},
    )
    handle = await launcher.launch(run)

    assert handle["launcher"] == "docker"
    assert handle["name"] == container_name(run.run_id, 1)
    assert (handle["run_id"], handle["attempt"]) == (run.run_id, 1)
    worker_exit = await exits.wait_for(run.run_id)
    assert (worker_exit.exit_code, worker_exit.signal, worker_exit.reason) == (0, None, None)
    assert worker_exit.attempt == 1
    health = await launcher.check_health(handle)
    assert (health.status, health.exit_code) == (HealthStatus.SUCCESS, 0)
    # WorkerRun.env wins over the configured env; both reach the container.
    assert "hello from the worker config run" in await launcher.debug_info(handle)

    info = await engine.containers.container(handle["container_id"]).show()
    labels = info["Config"]["Labels"]
    assert labels["runherd.run_id"] == run.run_id
    assert labels["runherd.attempt"] == "1"
    assert labels["runherd.job"] == "docker-test"
    assert info["HostConfig"]["NetworkMode"] == "host"
    assert info["HostConfig"]["AutoRemove"] is False


async def test_exit_three_is_failed(launch_env: LauncherFactory) -> None:
    launcher, exits = await launch_env()
    run = new_run(python_command("import sys; print('bad input on stderr', file=sys.stderr); sys.exit(3)"))
    handle = await launcher.launch(run)

    worker_exit = await exits.wait_for(run.run_id)
    assert (worker_exit.exit_code, worker_exit.signal, worker_exit.reason) == (3, None, "Error")
    health = await launcher.check_health(handle)
    assert (health.status, health.exit_code, health.reason) == (HealthStatus.FAILED, 3, "Error")
    assert health.exited
    assert "bad input on stderr" in await launcher.debug_info(handle)


async def test_running_then_terminate_at_once(launch_env: LauncherFactory) -> None:
    launcher, exits = await launch_env()
    run = new_run(SLEEP)
    handle = await launcher.launch(run)
    health = await launcher.check_health(handle)
    assert health.status == HealthStatus.RUNNING
    assert not health.exited

    started = time.monotonic()
    assert await launcher.terminate(handle, grace_seconds=0) is True
    worker_exit = await exits.wait_for(run.run_id, within=5)
    assert time.monotonic() - started < 3  # grace 0: no waiting for a polite exit
    assert (worker_exit.exit_code, worker_exit.signal, worker_exit.reason) == (137, 9, "SIGKILL")
    health = await launcher.check_health(handle)
    assert (health.status, health.exit_code, health.reason) == (HealthStatus.FAILED, 137, "SIGKILL")
    # An exited container has no worker left to stop, and neither has a removed one.
    assert await launcher.terminate(handle, grace_seconds=0) is False
    await launcher._client().containers.container(handle["container_id"]).delete(force=True)
    assert await launcher.terminate(handle, grace_seconds=0) is False
    assert (await launcher.check_health(handle)).status == HealthStatus.NOT_FOUND


async def test_terminate_with_grace_lets_the_worker_exit(launch_env: LauncherFactory) -> None:
    launcher, exits = await launch_env()
    run = new_run(
        python_command(
            "import signal, sys, time\n"
            "def bye(*_):\n    print('got SIGTERM, cleaning up', flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(60)\n"
        )
    )
    handle = await launcher.launch(run)

    async def ready() -> bool:
        return "ready" in await launcher.debug_info(handle)

    await wait_until(ready, within=5, what="the worker to install its SIGTERM handler")
    assert await launcher.terminate(handle, grace_seconds=5) is True
    worker_exit = await exits.wait_for(run.run_id, within=5)
    assert worker_exit.exit_code == 0
    assert "got SIGTERM, cleaning up" in await launcher.debug_info(handle)


async def test_docker_kill_is_seen_at_once(launch_env: LauncherFactory, engine: aiodocker.Docker) -> None:
    launcher, exits = await launch_env()
    run = new_run(SLEEP)
    handle = await launcher.launch(run)
    await health_becomes(launcher, handle, HealthStatus.RUNNING)

    killed_at = time.monotonic()
    await engine.containers.container(handle["container_id"]).kill(signal="SIGKILL")
    worker_exit = await exits.wait_for(run.run_id, within=5)
    latency = exits.seen_at[run.run_id] - killed_at
    assert latency < 1.0, f"watch() took {latency:.2f}s to report a killed container"
    assert (worker_exit.exit_code, worker_exit.signal, worker_exit.reason) == (137, 9, "SIGKILL")
    assert "SIGKILL" in (worker_exit.message or "")


async def test_memory_limit_exceeded_is_oomkilled(launch_env: LauncherFactory) -> None:
    launcher, exits = await launch_env(memory="16m")
    # bytes * n writes every page, so the memory is really used (a bytearray would stay lazy).
    run = new_run(python_command("print('allocating', flush=True); b = b'x' * (200 << 20)"))
    handle = await launcher.launch(run)

    worker_exit = await exits.wait_for(run.run_id, within=10)
    assert worker_exit.reason == "OOMKilled"
    assert worker_exit.exit_code == 137
    health = await launcher.check_health(handle)
    assert (health.status, health.reason) == (HealthStatus.FAILED, "OOMKilled")
    assert "memory limit" in (health.message or "")


async def test_debug_info_is_the_log_tail(launch_env: LauncherFactory) -> None:
    launcher, exits = await launch_env()
    run = new_run(python_command("for i in range(80): print(f'line {i}')"))
    handle = await launcher.launch(run)
    await exits.wait_for(run.run_id)

    # The last 50 lines. (stderr is in it too, see test_exit_three_is_failed; the engine copies
    # stdout and stderr separately, so their relative order is not asserted.)
    assert (await launcher.debug_info(handle)).splitlines() == [f"line {i}" for i in range(30, 80)]


# --------------------------------------------------------------------------------------------
# Launch errors and retries


async def test_missing_image_is_a_permanent_launch_error(launch_env: LauncherFactory) -> None:
    launcher, _ = await launch_env(image="runherd-no-such-image:never", launch_retries=3)
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        await launcher.launch(new_run(["true"]))
    assert caught.value.transient is False
    assert "No such image" in str(caught.value)  # the engine's own words
    assert time.monotonic() - started < 2  # not retried


async def test_unreachable_engine_is_transient_and_unknown(tmp_path: Any) -> None:
    # No engine needed: this one proves the failure path everywhere.
    launcher = await make_launcher(docker_url=f"unix://{tmp_path}/no-docker.sock", launch_retries=1)
    try:
        started = time.monotonic()
        with pytest.raises(LaunchError) as caught:
            await launcher.launch(new_run(["true"]))
        assert caught.value.transient is True
        assert "Cannot connect" in str(caught.value)
        assert time.monotonic() - started >= launcher.retry_base_delay  # one retry, backed off
        health = await launcher.check_health({"container_id": "0123456789ab"})
        assert health.status == HealthStatus.UNKNOWN  # never FAILED for an API failure
        assert "no-docker.sock" in await launcher.debug_info({"container_id": "0123456789ab"})
    finally:
        await launcher.close()


async def test_bad_command_is_a_permanent_error_and_leaves_no_container(
    launch_env: LauncherFactory, engine: aiodocker.Docker
) -> None:
    launcher, _ = await launch_env(launch_retries=3)
    run = new_run(["/no/such/worker"])
    with pytest.raises(LaunchError) as caught:
        await launcher.launch(run)
    assert caught.value.transient is False
    assert "no such file or directory" in str(caught.value)
    with pytest.raises(aiodocker.DockerError) as gone:
        await engine.containers.get(container_name(run.run_id, 1))
    assert gone.value.status == 404


async def test_relaunching_an_attempt_reuses_its_container(launch_env: LauncherFactory) -> None:
    # A launch whose answer was lost is retried: the 409 on the name must not start a second
    # worker for the same attempt.
    launcher, exits = await launch_env()
    run = new_run(SLEEP)
    first = await launcher.launch(run)
    second = await launcher.launch(run)
    assert second["container_id"] == first["container_id"]
    await launcher.terminate(first, grace_seconds=0)
    await exits.wait_for(run.run_id)


async def test_launch_takes_over_a_container_an_earlier_try_created(
    launch_env: LauncherFactory, engine: aiodocker.Docker
) -> None:
    # The previous try died between create and start: this try starts that container.
    launcher, exits = await launch_env()
    run = new_run(python_command("print('started by the second try')"))
    created = await engine.containers.create(
        build_container_spec(launcher.cfg, run), name=container_name(run.run_id, 1)
    )
    handle = await launcher.launch(run)
    assert handle["container_id"] == created.id
    assert (await exits.wait_for(run.run_id)).exit_code == 0
    assert "started by the second try" in await launcher.debug_info(handle)


async def test_name_held_by_another_container_is_transient(
    launch_env: LauncherFactory, engine: aiodocker.Docker
) -> None:
    launcher, _ = await launch_env(launch_retries=0)
    run = new_run(["true"])
    squatter = await engine.containers.create(
        {"Image": BASE_IMAGE, "Cmd": ["true"], "Labels": launcher_config()["labels"]},
        name=container_name(run.run_id, 1),
    )
    try:
        with pytest.raises(LaunchError) as caught:
            await launcher.launch(run)
        assert caught.value.transient is True
        assert "Conflict" in str(caught.value)
    finally:
        await squatter.delete(force=True)


# --------------------------------------------------------------------------------------------
# watch(): reconnects, adopt, remove after exit


@pytest.mark.parametrize("replay", [True, False], ids=["replay+sweep", "sweep-only"])
async def test_exit_during_stream_loss_is_reported_after_reconnect(
    launch_env: LauncherFactory, engine: aiodocker.Docker, replay: bool
) -> None:
    launcher, exits = await launch_env()
    if not replay:
        # No replay of past events on reconnect (as after an engine restart, which forgets
        # them): only the inspect sweep can find the exit.
        launcher.replay_margin = 0.0
    run = new_run(SLEEP)
    handle = await launcher.launch(run)
    await health_becomes(launcher, handle, HealthStatus.RUNNING)

    await launcher.pause_event_stream()
    await wait_until(lambda: not launcher.stream_connected, within=5, what="stream to drop")
    await engine.containers.container(handle["container_id"]).kill()

    async def exited() -> bool:
        return (await inspect_state(engine, handle["container_id"]))["Status"] == "exited"

    await wait_until(exited, within=5, what="the container to exit")
    assert not exits.exits.get(run.run_id)  # nobody could have seen it: the stream is down

    launcher.resume_event_stream()
    worker_exit = await exits.wait_for(run.run_id, within=5)
    assert (worker_exit.exit_code, worker_exit.reason) == (137, "SIGKILL")


async def test_adopted_containers_are_watched(launch_env: LauncherFactory) -> None:
    # An earlier launcher instance started two workers; a new one adopts them after a restart.
    old = await make_launcher()
    try:
        done_run, live_run = new_run(["true"]), new_run(SLEEP)
        done_handle = await old.launch(done_run)
        live_handle = await old.launch(live_run)
        await health_becomes(old, done_handle, HealthStatus.SUCCESS)
    finally:
        await old.close()

    launcher, exits = await launch_env()
    await launcher.adopt([done_handle, live_handle])
    # The one that exited while nobody watched is reported from inspect...
    assert (await exits.wait_for(done_run.run_id)).exit_code == 0
    # ... and the live one from the event stream when it dies.
    await launcher.terminate(live_handle, grace_seconds=0)
    assert (await exits.wait_for(live_run.run_id)).exit_code == 137


async def test_terminating_a_never_started_container_removes_it(
    launch_env: LauncherFactory, engine: aiodocker.Docker
) -> None:
    # A launcher died between create and start: the container sits in "created" for good.
    launcher, exits = await launch_env()
    run = new_run(SLEEP)
    name = container_name(run.run_id, 1)
    created = await engine.containers.create(build_container_spec(launcher.cfg, run), name=name)
    handle = {"launcher": "docker", "container_id": created.id, "name": name, "run_id": run.run_id, "attempt": 1}
    await launcher.adopt([handle])
    assert (await launcher.check_health(handle)).status == HealthStatus.RUNNING  # may start yet

    assert await launcher.terminate(handle) is True
    assert (await launcher.check_health(handle)).status == HealthStatus.NOT_FOUND
    worker_exit = await exits.wait_for(run.run_id)  # from the "destroy" event
    assert (worker_exit.exit_code, worker_exit.reason) == (None, "NotFound")


async def test_remove_after_exit_keeps_exit_code_and_log(launch_env: LauncherFactory) -> None:
    launcher, exits = await launch_env(remove_after_exit=True)
    run = new_run(python_command("print('last words'); raise SystemExit(5)"))
    handle = await launcher.launch(run)

    worker_exit = await exits.wait_for(run.run_id)
    assert worker_exit.exit_code == 5  # not lost, unlike with Docker's AutoRemove
    await health_becomes(launcher, handle, HealthStatus.NOT_FOUND)
    assert "last words" in await launcher.debug_info(handle)


async def test_venv_module_runs_inside_the_container(launch_env: LauncherFactory) -> None:
    # The binds make `<venv>/bin/python -m <module>` of the checkout work in the container.
    launcher, exits = await launch_env()
    run = new_run([PYTHON, "-m", "runherd.launchers.base"])
    handle = await launcher.launch(run)
    worker_exit = await exits.wait_for(run.run_id)
    assert worker_exit.exit_code == 0, await launcher.debug_info(handle)


# --------------------------------------------------------------------------------------------
# Configuration (no engine needed)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"image": None}, "image"),
        ({"image": ""}, "image"),
        ({"imagee": "x"}, "imagee"),
        ({"command": "python -m worker"}, "command"),
        ({"command": []}, "command"),
        ({"command": ["python", 3]}, "command"),
        ({"network": 5}, "network"),
        ({"env": ["A=1"]}, "env"),
        ({"env": {"A": {"nested": 1}}}, "env"),
        ({"volumes": ["/only-one-part"]}, "volumes"),
        ({"volumes": ["/src:relative"]}, "volumes"),
        ({"labels": {"runherd.run_id": "x"}}, "labels"),
        ({"memory": "lots"}, "memory"),
        ({"memory": -1}, "memory"),
        ({"cpus": "two"}, "cpus"),
        ({"cpus": True}, "cpus"),
        ({"container_options": ["--privileged"]}, "container_options"),
        ({"auto_remove": "yes"}, "auto_remove"),
        ({"auto_remove": True, "remove_after_exit": False}, "remove_after_exit"),
        ({"stop_grace_seconds": -1}, "stop_grace_seconds"),
        ({"docker_url": "/var/run/docker.sock"}, "docker_url"),
        ({"launch_retries": 1.5}, "launch_retries"),
    ],
)
def test_config_errors_name_the_key(overrides: dict[str, Any], key: str) -> None:
    config = {"image": "runherd-base:latest", **overrides}
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        DockerLauncher(config)


def test_config_defaults_and_container_spec() -> None:
    launcher = DockerLauncher(
        {
            "image": "img:1",
            "command": ["worker"],
            "env": {"A": "cfg", "PORT": 5432},
            "volumes": ["/data:/data:ro"],
            "labels": {"team": "data"},
            "memory": "256m",
            "cpus": 1.5,
            "auto_remove": True,
            "container_options": {"HostConfig": {"ShmSize": 1 << 26}, "User": "1000"},
        }
    )
    cfg = launcher.cfg
    assert (cfg.network, cfg.stop_grace_seconds, cfg.launch_retries) == ("host", 10.0, 3)
    assert cfg.memory == 256 << 20 and cfg.remove_after_exit is True

    spec = build_container_spec(cfg, new_run(None, env={"A": "run"}, attempt=2))
    assert spec["Cmd"] == ["worker"]  # the configured command when the run has none
    assert sorted(spec["Env"]) == ["A=run", "PORT=5432"]
    host = spec["HostConfig"]
    assert host["NetworkMode"] == "host" and host["Binds"] == ["/data:/data:ro"]
    assert host["Memory"] == host["MemorySwap"] == 256 << 20
    assert host["NanoCpus"] == 1_500_000_000 and host["ShmSize"] == 1 << 26
    assert "AutoRemove" not in host  # removal is runherd's, after the exit is recorded
    assert spec["User"] == "1000"
    assert spec["Labels"]["team"] == "data" and spec["Labels"]["runherd.attempt"] == "2"
    assert build_container_spec(cfg, new_run(["other"]))["Cmd"] == ["other"]
