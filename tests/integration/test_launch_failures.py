"""Launch failures are never silent: through the real services, on Docker and on Kubernetes.

A transient error (engine unreachable, HTTP 5xx) is retried with backoff, LAUNCH_ATTEMPTS times in
all; a permanent one (missing image, 403, a name held by another run) fails at once. Either way
the run ends FAILURE with the engine's own words in its reason, and a LAUNCH_FAILED event says the
same in its event log: no run is left STARTING without a reason.

Each launcher is configured with ``launch_retries: 0`` so that the services' retries are the only
ones and can be counted (a launcher's own retries multiply them: (launch_retries + 1) tries per
service attempt).
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from runherd import config
from runherd.launcher.launching import LAUNCH_ATTEMPTS
from runherd.launchers.base import WorkerRun
from runherd.launchers.kubernetes import build_job, job_name, validate_config
from tests.harness import PYTHON, ROOT, Env, eventually, status_log
from tests.k8s_emulator import K8sEmulator
from tests.launchers.docker_fixtures import docker_unavailable_reason, launcher_config

BACKOFFS = [0.5 * 2**i for i in range(LAUNCH_ATTEMPTS - 1)]  # launch_with_retries' default backoff
K8S_IMAGE = "registry.example.com/runherd/worker:test"
STEPS = [{"key": "a", "command": ["true"]}]


def use_launcher(env: Env, name: str, launcher: dict[str, Any]) -> None:
    """Configure the services with this launcher section (not merged with the harness's defaults)."""
    section = config.from_mapping({"run_launcher": {"name": name, "config": launcher}}).run_launcher
    env.cfg = replace(env.configure(), run_launcher=section)


async def events_of(env: Env, run_id: str, type_: str) -> list[dict[str, Any]]:
    return [e for e in await env.events(run_id) if e["type"] == type_]


async def failed_launch(env: Env, run_id: str, *words: str, transient: bool) -> dict[str, Any]:
    """The run failed to launch: FAILURE with the words in its reason and in a LAUNCH_FAILED event."""
    run = await env.wait_status(run_id, "FAILURE", "SUCCESS", timeout=30)
    assert run["status"] == "FAILURE"
    assert run["reason"].startswith("launch failed: "), run["reason"]
    for word in words:
        assert word in run["reason"], (word, run["reason"])
    [event] = await events_of(env, run_id, "LAUNCH_FAILED")
    assert event["message"] == run["reason"]
    assert event["data"]["transient"] is transient
    assert not await events_of(env, run_id, "RUN_START")  # no worker ever ran
    return run


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def assert_backoff(times: list[float]) -> None:
    """The tries were spaced by the services' exponential backoff (with some slack for the tries)."""
    assert len(times) == LAUNCH_ATTEMPTS, times
    for gap, backoff in zip(gaps(times), BACKOFFS, strict=True):
        assert backoff * 0.9 <= gap <= backoff + 1.5, (gaps(times), BACKOFFS)


# --- Docker ----------------------------------------------------------------------------------


def launch_failures_logged(caplog: pytest.LogCaptureFixture, run_id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "runherd.launchers.docker" and r.getMessage().startswith(f"docker launch failed run_id={run_id} ")
    ]


async def test_docker_engine_down_is_retried_then_fails_with_the_engine_message(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    socket = env.tmp / "no-docker.sock"  # nothing listens there
    use_launcher(env, "docker", launcher_config(docker_url=f"unix://{socket}", launch_retries=0))
    async with status_log(env.amqp_url) as statuses:
        await env.start()
        run_id = await env.submit(STEPS)
        run = await failed_launch(
            env, run_id, "docker engine unreachable", f"Cannot connect to unix socket {socket}", transient=True
        )
        await eventually(lambda: "FAILURE" in statuses.of(run_id), what="the FAILURE status message")

    assert_backoff([r.created for r in launch_failures_logged(caplog, run_id)])
    assert statuses.of(run_id) == ["QUEUED", "STARTING", "FAILURE"]
    [failure] = [m for m in statuses.messages if m["run_id"] == run_id and m["status"] == "FAILURE"]
    assert failure["reason"] == run["reason"]


async def test_docker_missing_image_fails_at_once_with_the_engine_message(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    image = f"runherd-no-such-image:{uuid.uuid4().hex[:8]}"
    use_launcher(env, "docker", launcher_config(image=image, launch_retries=0))
    await env.start()
    run_id = await env.submit(STEPS)

    await failed_launch(env, run_id, f"No such image: {image}", transient=False)
    assert len(launch_failures_logged(caplog, run_id)) == 1  # a permanent error is not retried


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.fixture
async def k8s(env: Env) -> AsyncIterator[K8sEmulator]:
    """The API-server emulator, and the services configured to launch Jobs on it."""
    async with K8sEmulator() as emulator:
        use_launcher(
            env,
            "kubernetes",
            {
                "image": K8S_IMAGE,
                "command": [PYTHON, "-m", "runherd.cli", "worker"],
                "env": {"PYTHONPATH": str(ROOT)},
                "kubeconfig_file": str(emulator.write_kubeconfig(env.tmp / "kubeconfig")),
                "context": "emulator",
                "launch_retries": 0,
                "request_timeout_seconds": 5,
            },
        )
        yield emulator
        await env.stop_all()  # the services first, while the emulator still answers


def creates(emulator: K8sEmulator) -> list[Any]:
    return [r for r in emulator.requests if r.method == "POST" and r.path.endswith("/jobs")]


async def test_k8s_500_is_retried_with_backoff_then_fails_with_the_api_message(env: Env, k8s: K8sEmulator) -> None:
    k8s.inject(500, times=100, method="POST", path="/jobs$", message="etcdserver: request timed out")
    await env.start()
    run_id = await env.submit(STEPS)

    await failed_launch(env, run_id, "(HTTP 500): etcdserver: request timed out", transient=True)
    assert_backoff([r.at for r in creates(k8s)])
    assert k8s.jobs() == []


async def test_k8s_500_that_clears_is_retried_and_the_run_succeeds(env: Env, k8s: K8sEmulator) -> None:
    k8s.inject(500, times=2, method="POST", path="/jobs$", message="etcdserver: leader changed")
    await env.start()
    run_id = await env.submit(STEPS)

    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS", run["reason"]
    assert [r.status for r in creates(k8s)] == [500, 500, 201]
    assert len(k8s.jobs()) == 1
    assert not await events_of(env, run_id, "LAUNCH_FAILED")


async def test_k8s_403_fails_at_once_with_the_api_message(env: Env, k8s: K8sEmulator) -> None:
    message = 'jobs.batch is forbidden: User "system:serviceaccount:runherd:launcher" cannot create resource "jobs"'
    k8s.inject(403, times=100, method="POST", path="/jobs$", message=message)
    await env.start()
    run_id = await env.submit(STEPS)

    await failed_launch(env, run_id, "(HTTP 403)", message, transient=False)
    assert len(creates(k8s)) == 1  # not retried


async def test_k8s_409_after_a_lost_reply_is_the_job_already_launched(env: Env, k8s: K8sEmulator) -> None:
    # The first create takes effect but its reply is a 500: the retry meets its own Job (409).
    k8s.inject(500, method="POST", path="/jobs$", after=True, message="reply lost")
    await env.start()
    run_id = await env.submit(STEPS)

    run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=30)
    assert run["status"] == "SUCCESS", run["reason"]
    # The Job's worker may finish the run before the retry: wait for it, then for the handle.
    await eventually(lambda: [r.status for r in creates(k8s)] == [500, 409], what="the retried create")
    assert (await env.handle(run_id))["job_name"] == job_name(run_id, 1)
    assert len(k8s.pods(job_name(run_id, 1))) <= 1  # one worker, not two
    assert not await events_of(env, run_id, "LAUNCH_FAILED")


async def test_k8s_409_name_held_by_another_run_fails_with_the_api_message(env: Env, k8s: K8sEmulator) -> None:
    run_id = str(uuid.uuid4())
    # Another run's Job already holds the name this run's first attempt needs.
    other = WorkerRun(run_id="someone-else", attempt=1, job="other", env={}, command=[PYTHON, "-c", "pass"])
    body = build_job(validate_config({"image": K8S_IMAGE}), other, job_name(run_id, 1))
    k8s.store.create("Job", "default", body)
    await env.start()
    await env.submit(STEPS, run_id=run_id)

    await failed_launch(env, run_id, "(HTTP 409)", "already exists", "belongs to run someone-else", transient=False)
    assert len(creates(k8s)) == 1
