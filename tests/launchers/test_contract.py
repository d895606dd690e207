"""The run launcher contract of DESIGN.md, one suite run against every built-in launcher.

Each test runs three times: the process launcher (local subprocesses), the Docker launcher (a real
engine; skipped with the reason when none answers) and the Kubernetes launcher (the API-server
emulator of tests/k8s_emulator, whose "kubelet" runs each Job's command as a real process). A
launcher of one's own is checked by adding a backend to ``BACKENDS``, as the README's example is.

Workers here are tiny Python commands (``WorkerRun.command``), not ``runherd worker``: the contract
is about starting, stopping and watching a process, not about what it does. The sim launcher's
virtual workers (no process) get the same script through their ``RUNHERD_SIM_*`` env instead, with
the fleet in a thread of the test's process (``sim``) and in a process of its own (``sim_process``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import orjson
import pytest

from examples.custom_launcher import NiceLauncher
from runherd.launchers.base import Handle, HealthStatus, RunLauncher, WorkerExit, WorkerRun
from runherd.launchers.process import ProcessLauncher
from runherd.launchers.sim import SimLauncher
from tests import harness
from tests.launchers import k8s_fixtures
from tests.launchers.docker_fixtures import (
    launcher_config,
    make_launcher,
    worker_binds,
)
from tests.launchers.k8s_fixtures import K8sEmulator, LauncherFactory, wait_for

k8s_emulator = k8s_fixtures.k8s_emulator
k8s_kubeconfig = k8s_fixtures.k8s_kubeconfig
k8s_launcher_factory = k8s_fixtures.k8s_launcher_factory

PY = sys.executable
# "custom" is examples/custom_launcher.py, the README's launcher of one's own: it holds the contract too.
# "sim_process" is the sim launcher with its fleet in a child process (``fleet_process: true``).
BACKENDS = ["process", "docker", "kubernetes", "custom", "sim", "sim_process"]
# A worker that says it is up, exits 143 on SIGTERM (Python as a container's PID 1 would otherwise
# ignore it) and otherwise sleeps until the file argv[1] exists, then exits with argv[2].
WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
print('worker up', flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
sys.exit(int(sys.argv[2]))
"""


class Exits:
    """Consumes ``launcher.watch()`` in the background; tests wait for one run's exit."""

    def __init__(self, launcher: RunLauncher) -> None:
        stream = launcher.watch()
        assert stream is not None, f"{type(launcher).__name__}.watch() returned None"
        self.seen: list[WorkerExit] = []
        self._task = asyncio.create_task(self._consume(stream))

    async def _consume(self, stream: AsyncIterator[WorkerExit]) -> None:
        async for worker_exit in stream:
            self.seen.append(worker_exit)

    async def of(self, run: WorkerRun, within: float = 10) -> WorkerExit:
        def found() -> WorkerExit | None:
            return next((e for e in self.seen if (e.run_id, e.attempt) == (run.run_id, run.attempt)), None)

        return await wait_for(found, within, f"the exit of run {run.run_id} attempt {run.attempt}")

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class Backend:
    """One launcher kind, as the contract tests need it."""

    name: str
    tmp: Path
    build: Callable[[], Awaitable[RunLauncher]]
    vanish: Callable[[RunLauncher, Handle], Awaitable[None]]  # the backend forgets an exited worker
    forge: Callable[[Handle], Handle]  # a handle naming a worker that does not exist
    sim_config: dict[str, Any] = field(default_factory=dict)  # the sim launcher's config
    launchers: list[RunLauncher] = field(default_factory=list)
    watchers: list[Exits] = field(default_factory=list)

    async def launcher(self) -> tuple[RunLauncher, Exits]:
        """A new launcher instance with a consumer on its watch(); closed at teardown."""
        launcher = await self.build()
        self.launchers.append(launcher)
        exits = Exits(launcher)
        self.watchers.append(exits)
        return launcher, exits

    def run(self, command: list[str]) -> WorkerRun:
        return WorkerRun(run_id=str(uuid.uuid4()), attempt=1, job="contract", env={"CONTRACT": "yes"}, command=command)

    def printing(self, text: str, code: int) -> WorkerRun:
        """A worker that prints ``text`` and the env's CONTRACT ("<text> yes"), then exits with ``code``."""
        if self.name.startswith("sim"):
            outcome = {"RUNHERD_SIM_OUTCOME": "succeed" if code == 0 else "crash", "RUNHERD_SIM_EXIT_CODE": str(code)}
            return self._sim_run({"RUNHERD_SIM_SAY": f"{text} yes", **outcome})
        script = f"import os, sys; print({text!r}, os.environ['CONTRACT'], flush=True); sys.exit({code})"
        return self.run([PY, "-c", script])

    def waiting_worker(self) -> tuple[WorkerRun, Callable[[], Awaitable[None]]]:
        """A worker that prints "worker up" and runs until the returned release is awaited, then exits 0."""
        if self.name.startswith("sim"):
            run = self._sim_run({"RUNHERD_SIM_SAY": "worker up", "RUNHERD_SIM_OUTCOME": "wait"})

            async def command() -> None:
                assert SimLauncher(self.sim_config).command("succeed", [run.run_id]) == 1

            return run, command
        flag = self.tmp / f"exit-{uuid.uuid4().hex[:8]}"

        async def touch() -> None:
            flag.touch()

        return self.run([PY, "-c", WORKER, str(flag), "0"]), touch

    def _sim_run(self, env: dict[str, str]) -> WorkerRun:
        return WorkerRun(run_id=str(uuid.uuid4()), attempt=1, job="contract", env={"CONTRACT": "yes", **env})

    async def close(self) -> None:
        for exits in self.watchers:
            await exits.stop()
        for launcher in self.launchers:
            await launcher.close()


def _process(tmp: Path) -> Backend:
    async def build() -> RunLauncher:
        return ProcessLauncher({"log_dir": str(tmp / "logs"), "terminate_grace_seconds": 2})

    async def vanish(launcher: RunLauncher, handle: Handle) -> None:
        return None  # an exited, reaped process leaves nothing behind

    def forge(handle: Handle) -> Handle:
        # The same pid with another start time: what a reused pid looks like.
        return {**handle, "start_time": (handle["start_time"] or 0) + 1}

    return Backend("process", tmp, build, vanish, forge)


def _custom(tmp: Path) -> Backend:
    async def build() -> RunLauncher:
        return NiceLauncher({"niceness": 5, "log_dir": str(tmp / "logs"), "terminate_grace_seconds": 2})

    backend = _process(tmp)
    backend.name, backend.build = "custom", build
    return backend


def _docker(tmp: Path, engine: aiodocker.Docker) -> Backend:
    # The tmp dir is bind-mounted read-write so the test can tell the worker when to exit.
    config = launcher_config(volumes=[*worker_binds(), f"{tmp}:{tmp}"])

    async def build() -> RunLauncher:
        return await make_launcher(**config)

    async def vanish(launcher: RunLauncher, handle: Handle) -> None:
        await engine.containers.container(handle["container_id"]).delete(force=True)

    def forge(handle: Handle) -> Handle:
        return {**handle, "container_id": "f" * 64, "name": "runherd-no-such-container"}

    return Backend("docker", tmp, build, vanish, forge)


def _kubernetes(tmp: Path, factory: LauncherFactory, emulator: K8sEmulator) -> Backend:
    async def build() -> RunLauncher:
        return factory()

    async def vanish(launcher: RunLauncher, handle: Handle) -> None:
        await launcher.terminate(handle)  # deletes the Job (and its pods)
        await wait_for(lambda: emulator.job(handle["job_name"]) is None, 5, "the Job to be deleted")

    def forge(handle: Handle) -> Handle:
        return {**handle, "job_name": "runherd-no-such-job-1"}

    return Backend("kubernetes", tmp, build, vanish, forge)


def _sim(tmp: Path, amqp_url: str, *, fleet_process: bool = False) -> Backend:
    config = {"amqp_url": amqp_url, "step_seconds": 0.05, "terminate_grace_seconds": 2, "fleet_process": fleet_process}

    async def build() -> RunLauncher:
        return SimLauncher(config)

    async def vanish(launcher: RunLauncher, handle: Handle) -> None:
        return None  # an exited virtual worker is only remembered, as a reaped process is

    def forge(handle: Handle) -> Handle:
        return {**handle, "worker_id": "no-such-worker"}

    return Backend("sim_process" if fleet_process else "sim", tmp, build, vanish, forge, sim_config=config)


@pytest.fixture
async def sim_backend(tmp_path: Path, env: harness.Env) -> AsyncIterator[Backend]:
    made = _sim(tmp_path, env.amqp_url)
    yield made
    await made.close()


@pytest.fixture
async def sim_process_backend(tmp_path: Path, env: harness.Env) -> AsyncIterator[Backend]:
    made = _sim(tmp_path, env.amqp_url, fleet_process=True)
    yield made
    await made.close()


@pytest.fixture
async def process_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    made = _process(tmp_path)
    yield made
    await made.close()


@pytest.fixture
async def custom_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    made = _custom(tmp_path)
    yield made
    await made.close()


@pytest.fixture
async def docker_backend(tmp_path: Path, docker_engine: aiodocker.Docker) -> AsyncIterator[Backend]:
    made = _docker(tmp_path, docker_engine)
    yield made
    await made.close()


@pytest.fixture
async def kubernetes_backend(
    tmp_path: Path, k8s_launcher_factory: LauncherFactory, k8s_emulator: K8sEmulator
) -> AsyncIterator[Backend]:
    made = _kubernetes(tmp_path, k8s_launcher_factory, k8s_emulator)
    yield made
    await made.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each contract test once per launcher; only the backend in use is set up."""
    made: Backend = request.getfixturevalue(f"{request.param}_backend")
    return made


def json_round_trip(handle: Handle) -> Handle:
    copy = orjson.loads(orjson.dumps(handle))
    assert copy == handle
    return copy


# --- the contract ----------------------------------------------------------------------------


async def test_exit_zero_is_reported_and_success(backend: Backend) -> None:
    launcher, exits = await backend.launcher()
    run = backend.printing("all good", 0)
    handle = await launcher.launch(run)

    worker_exit = await exits.of(run)
    assert worker_exit.exit_code == 0
    health = await launcher.check_health(handle)
    assert (health.status, health.exit_code) == (HealthStatus.SUCCESS, 0)
    assert "all good yes" in await launcher.debug_info(handle)


async def test_exit_three_is_reported_and_failed(backend: Backend) -> None:
    launcher, exits = await backend.launcher()
    run = backend.printing("about to fail", 3)
    handle = await launcher.launch(run)

    worker_exit = await exits.of(run)
    assert worker_exit.exit_code == 3
    health = await launcher.check_health(handle)
    assert (health.status, health.exit_code) == (HealthStatus.FAILED, 3)
    assert "about to fail" in await launcher.debug_info(handle)


async def test_running_worker_then_terminate(backend: Backend) -> None:
    launcher, exits = await backend.launcher()
    run, _ = backend.waiting_worker()
    handle = json_round_trip(await launcher.launch(run))

    assert (await launcher.check_health(handle)).status is HealthStatus.RUNNING
    # debug_info of a live worker already holds its output.
    await wait_for(lambda: _contains(launcher.debug_info(handle), "worker up"), 10, "the worker's output")
    # A handle naming a worker that is not there (another pid start time, container, Job).
    assert (await launcher.check_health(backend.forge(handle))).status is HealthStatus.NOT_FOUND

    assert await launcher.terminate(handle, grace_seconds=5) is True
    worker_exit = await exits.of(run)
    assert (worker_exit.run_id, worker_exit.attempt) == (run.run_id, 1)
    health = await launcher.check_health(handle)
    assert health.exited, health


async def test_a_gone_worker_is_never_running(backend: Backend) -> None:
    launcher, exits = await backend.launcher()
    run = backend.printing("short-lived", 0)
    handle = await launcher.launch(run)
    await exits.of(run)
    await backend.vanish(launcher, handle)

    other, _ = await backend.launcher()  # e.g. the monitor, or a restarted launcher
    for asking in (launcher, other):
        health = await asking.check_health(handle)
        assert health.exited and health.status is not HealthStatus.RUNNING, (asking, health)
    assert await other.terminate(handle, grace_seconds=0) is False  # nothing left to stop


async def test_adopted_worker_exit_is_reported(backend: Backend) -> None:
    first, _ = await backend.launcher()
    run, release = backend.waiting_worker()
    handle = await first.launch(run)
    await wait_for(lambda: _contains(first.debug_info(handle), "worker up"), 10, "the worker to run")

    # A new instance (a restarted launcher service) is handed the stored handle.
    second, exits = await backend.launcher()
    stored = json_round_trip(handle)
    await second.adopt([stored])
    assert (await second.check_health(stored)).status is HealthStatus.RUNNING
    await release()

    worker_exit = await exits.of(run)
    assert (worker_exit.run_id, worker_exit.attempt) == (run.run_id, 1)
    # The process launcher cannot know the exit code of a process it did not start.
    assert worker_exit.exit_code in (0, None)
    await wait_for(lambda: _exited(second, stored), 5, "health to show the exit")


async def _contains(text: Awaitable[str], needle: str) -> bool:
    return needle in await text


async def _exited(launcher: RunLauncher, handle: Handle) -> bool:
    health = await launcher.check_health(handle)
    return health.exited and health.status is not HealthStatus.FAILED
