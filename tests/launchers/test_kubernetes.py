"""KubernetesLauncher against the API emulator: real HTTP, real worker subprocesses."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runherd.errors import ConfigError, LaunchError
from runherd.launchers.base import HealthStatus, WorkerExit, WorkerRun
from runherd.launchers.kubernetes import KubernetesLauncher, health_from, job_name
from tests.launchers import k8s_fixtures
from tests.launchers.k8s_fixtures import K8sEmulator, LauncherFactory, wait_for

# Bind the shared fixtures into this module so pytest finds them.
k8s_emulator = k8s_fixtures.k8s_emulator
k8s_kubeconfig = k8s_fixtures.k8s_kubeconfig
k8s_launcher_factory = k8s_fixtures.k8s_launcher_factory
k8s_launcher = k8s_fixtures.k8s_launcher

PY = sys.executable
SLEEP = [PY, "-c", "import time; time.sleep(60)"]
# Exits with argv[2] once the file argv[1] exists: the test decides when the worker ends.
WAIT_FOR_FILE = (
    "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\nsys.exit(int(sys.argv[2]))\n"
)


def exits_when(flag: Path, code: int = 0) -> list[str]:
    return [PY, "-c", WAIT_FOR_FILE, str(flag), str(code)]


def worker_run(command: list[str] | None = None, **kwargs: Any) -> WorkerRun:
    fields: dict[str, Any] = {
        "run_id": str(uuid.uuid4()),
        "attempt": 1,
        "job": "nightly-etl",
        "env": {"RUNHERD_PLAN": "{}"},
        "command": command,
    }
    fields.update(kwargs)
    return WorkerRun(**fields)


async def health_becomes(
    launcher: KubernetesLauncher, handle: dict[str, Any], status: HealthStatus, within: float = 5
) -> Any:
    async def check() -> Any:
        health = await launcher.check_health(handle)
        return health if health.status == status else None

    return await wait_for(check, within, f"health {status}")


async def next_exit(exits: AsyncIterator[WorkerExit], within: float = 5) -> WorkerExit:
    return await asyncio.wait_for(anext(exits), within)


# --- launch and exit --------------------------------------------------------------------------


async def test_exit_zero_is_success_and_watched(k8s_launcher: KubernetesLauncher) -> None:
    exits = k8s_launcher.watch()
    assert exits is not None
    run = worker_run([PY, "-c", "print('done')"])
    handle = await k8s_launcher.launch(run)
    assert handle == {
        "launcher": "kubernetes",
        "namespace": "default",
        "job_name": job_name(run.run_id, 1),
        "run_id": run.run_id,
        "attempt": 1,
    }
    worker_exit = await next_exit(exits)
    assert (worker_exit.run_id, worker_exit.attempt, worker_exit.exit_code) == (run.run_id, 1, 0)
    health = await k8s_launcher.check_health(handle)
    assert (health.status, health.exit_code) == (HealthStatus.SUCCESS, 0)
    await exits.aclose()


async def test_exit_three_is_failed(k8s_launcher: KubernetesLauncher) -> None:
    exits = k8s_launcher.watch()
    assert exits is not None
    handle = await k8s_launcher.launch(worker_run([PY, "-c", "raise SystemExit(3)"]))
    health = await health_becomes(k8s_launcher, handle, HealthStatus.FAILED)
    assert (health.exit_code, health.reason) == (3, "Error")
    worker_exit = await next_exit(exits)
    assert (worker_exit.exit_code, worker_exit.reason) == (3, "Error")
    await exits.aclose()


async def test_running_then_terminate_kills_the_process(
    k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator
) -> None:
    handle = await k8s_launcher.launch(worker_run(SLEEP))
    name = handle["job_name"]
    await wait_for(lambda: (rt := k8s_emulator.runtime(name)) and rt.proc, what="process start")
    health = await k8s_launcher.check_health(handle)
    assert health.status == HealthStatus.RUNNING
    process = k8s_emulator.runtime(name).proc  # type: ignore[union-attr]

    assert await k8s_launcher.terminate(handle) is True
    await wait_for(lambda: k8s_emulator.job(name) is None, what="Job deleted")
    assert k8s_emulator.pods(name) == []
    assert process.returncode == -signal.SIGTERM
    assert k8s_emulator.deletions[-1][2] in ("Foreground", "Background")
    assert (await k8s_launcher.check_health(handle)).status == HealthStatus.NOT_FOUND
    assert await k8s_launcher.terminate(handle) is False


async def test_job_spec_carries_the_config(k8s_launcher_factory: LauncherFactory, k8s_emulator: K8sEmulator) -> None:
    k8s_emulator.add_secret("db-creds", {"DB_PASSWORD": "s3cret"}, namespace="runs")
    config = {
        "namespace": "runs",
        "service_account_name": "runherd-worker",
        "env": {"FROM_CONFIG": "config", "OVERRIDDEN": "config", "PORT": 5432},
        "env_from_secrets": ["db-creds"],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "image_pull_secrets": ["regcred"],
        "node_selector": {"pool": "batch"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "runs", "effect": "NoSchedule"}],
        "labels": {"team": "data"},
        "ttl_seconds_after_finished": 600,
    }
    launcher = k8s_launcher_factory(**config)
    printenv = "import os; print(*(os.environ[k] for k in ('FROM_CONFIG', 'OVERRIDDEN', 'DB_PASSWORD')))"
    run = worker_run([PY, "-c", printenv], env={"OVERRIDDEN": "run"}, max_runtime_seconds=900, job="etl.daily")
    handle = await launcher.launch(run)
    assert handle["namespace"] == "runs"
    job = k8s_emulator.job(handle["job_name"], namespace="runs")
    assert job is not None
    labels = job["metadata"]["labels"]
    assert labels["runherd/run_id"] == run.run_id
    assert labels["runherd/attempt"] == "1"
    assert labels["runherd/job"] == "etl.daily"
    assert labels["team"] == "data"
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 900
    assert spec["template"]["metadata"]["labels"] == labels
    pod_spec = spec["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["serviceAccountName"] == "runherd-worker"
    assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod_spec["nodeSelector"] == {"pool": "batch"}
    assert pod_spec["tolerations"] == config["tolerations"]
    (container,) = pod_spec["containers"]
    assert container["image"] == k8s_fixtures.TEST_IMAGE
    assert container["command"] == run.command
    assert container["envFrom"] == [{"secretRef": {"name": "db-creds"}}]
    assert container["resources"] == config["resources"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"FROM_CONFIG": "config", "OVERRIDDEN": "run", "PORT": "5432"}
    # ... and the worker really saw that environment, the secret included.
    await health_becomes(launcher, handle, HealthStatus.SUCCESS)
    assert "config run s3cret" in await launcher.debug_info(handle)


async def test_configured_command_is_the_default(
    k8s_launcher_factory: LauncherFactory, k8s_emulator: K8sEmulator
) -> None:
    launcher = k8s_launcher_factory(command=[PY, "-c", "print('configured')"])
    handle = await launcher.launch(worker_run(None))
    job = k8s_emulator.job(handle["job_name"])
    assert job is not None
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "print('configured')"
    assert "activeDeadlineSeconds" not in job["spec"]
    await health_becomes(launcher, handle, HealthStatus.SUCCESS)


# --- failure reasons --------------------------------------------------------------------------


async def test_image_pull_backoff_is_failed(k8s_launcher_factory: LauncherFactory) -> None:
    launcher = k8s_launcher_factory(image="registry.example.com/missing:1.0")
    handle = await launcher.launch(worker_run())
    health = await health_becomes(launcher, handle, HealthStatus.FAILED)
    assert health.reason in ("ImagePullBackOff", "ErrImagePull")  # the pull fails, then backs off
    health = await wait_for(_reason_is(launcher, handle, "ImagePullBackOff"), what="back-off")
    assert health.status == HealthStatus.FAILED
    assert "missing" in (health.message or "")
    assert "Back-off pulling image" in await launcher.debug_info(handle)


async def test_missing_secret_is_failed(k8s_launcher_factory: LauncherFactory) -> None:
    launcher = k8s_launcher_factory(env_from_secrets=["nobody-made-this"])
    handle = await launcher.launch(worker_run())
    health = await health_becomes(launcher, handle, HealthStatus.FAILED)
    assert health.reason == "CreateContainerConfigError"
    assert 'secret "nobody-made-this" not found' in (health.message or "")


def test_a_finished_pod_counts_before_the_job_controller_notices() -> None:
    job = {"metadata": {"name": "j"}, "status": {"active": 1}}
    pod = {
        "metadata": {"name": "j-abcde"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "runherd-worker", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
            ],
        },
    }
    health = health_from(job, pod)
    assert (health.status, health.exit_code, health.reason) == (HealthStatus.FAILED, 137, "OOMKilled")
    assert health_from(job, None).status == HealthStatus.RUNNING


def _reason_is(launcher: KubernetesLauncher, handle: dict[str, Any], reason: str) -> Any:
    async def check() -> Any:
        health = await launcher.check_health(handle)
        return health if health.reason == reason else None

    return check


async def test_unschedulable_stays_running_with_reason(
    k8s_launcher_factory: LauncherFactory,
) -> None:
    launcher = k8s_launcher_factory(node_selector={"pool": "gpu"})
    handle = await launcher.launch(worker_run(SLEEP))
    health = await wait_for(_reason_is(launcher, handle, "Unschedulable"), what="Unschedulable")
    assert health.status == HealthStatus.RUNNING
    assert "didn't match Pod's node affinity/selector" in (health.message or "")
    assert "FailedScheduling" in await launcher.debug_info(handle)


async def test_oom_killed(k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator) -> None:
    exits = k8s_launcher.watch()
    assert exits is not None
    handle = await k8s_launcher.launch(worker_run(SLEEP))
    await wait_for(lambda: (rt := k8s_emulator.runtime(handle["job_name"])) and rt.proc)
    await k8s_emulator.oom_kill(handle["job_name"])
    health = await health_becomes(k8s_launcher, handle, HealthStatus.FAILED)
    assert (health.reason, health.exit_code) == ("OOMKilled", 137)
    worker_exit = await next_exit(exits)
    assert (worker_exit.reason, worker_exit.signal) == ("OOMKilled", signal.SIGKILL)
    await exits.aclose()


async def test_max_runtime_is_deadline_exceeded(k8s_launcher: KubernetesLauncher) -> None:
    handle = await k8s_launcher.launch(worker_run(SLEEP, max_runtime_seconds=1))
    health = await health_becomes(k8s_launcher, handle, HealthStatus.FAILED, within=6)
    assert health.reason == "DeadlineExceeded"


# --- watch ------------------------------------------------------------------------------------


def _list_requests(emulator: K8sEmulator) -> int:
    return sum(
        1 for r in emulator.requests if r.method == "GET" and r.path.endswith("/jobs") and "watch" not in r.query
    )


async def test_watch_resumes_from_resource_version_after_a_drop(
    k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator, tmp_path: Path
) -> None:
    exits = k8s_launcher.watch()
    assert exits is not None
    flag = tmp_path / "finish"
    handle = await k8s_launcher.launch(worker_run(exits_when(flag, 0)))
    pending = asyncio.ensure_future(next_exit(exits))
    await wait_for(lambda: k8s_emulator.open_watch_count() == 1, what="watch open")
    watches, lists = len(k8s_emulator.watch_requests()), _list_requests(k8s_emulator)

    k8s_emulator.hold_watches()
    assert k8s_emulator.drop_watches() == 1
    flag.touch()  # the worker exits while nobody watches
    await wait_for(lambda: k8s_emulator.job(handle["job_name"])["status"].get("succeeded"))  # type: ignore[index]
    finished_rv = int(k8s_emulator.job(handle["job_name"])["metadata"]["resourceVersion"])  # type: ignore[index]
    k8s_emulator.release_watches()

    worker_exit = await pending
    assert (worker_exit.run_id, worker_exit.exit_code) == (handle["run_id"], 0)
    resumed = k8s_emulator.watch_requests()[watches]
    assert int(resumed.query["resourceVersion"]) < finished_rv
    assert _list_requests(k8s_emulator) == lists  # resumed, not relisted
    await exits.aclose()


async def test_watch_relists_after_gone_without_missing_an_exit(
    k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator, tmp_path: Path
) -> None:
    exits = k8s_launcher.watch()
    assert exits is not None
    first, second = tmp_path / "first", tmp_path / "second"
    handle_a = await k8s_launcher.launch(worker_run(exits_when(first, 4)))
    handle_b = await k8s_launcher.launch(worker_run(exits_when(second, 0)))
    pending = asyncio.ensure_future(next_exit(exits))
    await wait_for(lambda: k8s_emulator.open_watch_count() == 1, what="watch open")
    lists = _list_requests(k8s_emulator)

    k8s_emulator.hold_watches()
    k8s_emulator.drop_watches()
    first.touch()
    await wait_for(lambda: k8s_emulator.job(handle_a["job_name"])["status"].get("failed"))  # type: ignore[index]
    k8s_emulator.compact()  # the launcher's resourceVersion is now too old: 410 Gone
    k8s_emulator.release_watches()

    worker_exit = await pending
    assert (worker_exit.run_id, worker_exit.exit_code) == (handle_a["run_id"], 4)
    assert _list_requests(k8s_emulator) == lists + 1
    second.touch()  # ... and the new watch, from the relist's version, sees later exits
    worker_exit = await next_exit(exits)
    assert (worker_exit.run_id, worker_exit.exit_code) == (handle_b["run_id"], 0)
    await exits.aclose()


async def test_adopted_handles_are_watched(k8s_launcher_factory: LauncherFactory, tmp_path: Path) -> None:
    flag = tmp_path / "finish"
    old = k8s_launcher_factory()
    handle = await old.launch(worker_run(exits_when(flag, 2)))
    await old.close()  # the launcher service restarts ...
    new = k8s_launcher_factory()
    await new.adopt([handle])
    exits = new.watch()
    assert exits is not None
    pending = asyncio.ensure_future(next_exit(exits))
    flag.touch()
    worker_exit = await pending
    assert (worker_exit.run_id, worker_exit.exit_code) == (handle["run_id"], 2)
    await exits.aclose()


async def test_watch_reports_a_deleted_job(k8s_launcher: KubernetesLauncher) -> None:
    exits = k8s_launcher.watch()
    assert exits is not None
    handle = await k8s_launcher.launch(worker_run(SLEEP))
    pending = asyncio.ensure_future(next_exit(exits))
    assert await k8s_launcher.terminate(handle, grace_seconds=0)
    worker_exit = await pending
    assert (worker_exit.run_id, worker_exit.reason) == (handle["run_id"], "Deleted")
    await exits.aclose()


# --- API errors -------------------------------------------------------------------------------


async def test_500_on_create_is_retried(k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator) -> None:
    k8s_emulator.inject(500, times=2, method="POST", path="/jobs$")
    handle = await k8s_launcher.launch(worker_run())
    posts = [r for r in k8s_emulator.requests if r.method == "POST"]
    assert [r.status for r in posts] == [500, 500, 201]
    await health_becomes(k8s_launcher, handle, HealthStatus.SUCCESS)


async def test_500s_beyond_the_retries_are_a_transient_launch_error(
    k8s_launcher_factory: LauncherFactory, k8s_emulator: K8sEmulator
) -> None:
    launcher = k8s_launcher_factory(launch_retries=1)
    k8s_emulator.inject(503, times=5, method="POST", message="etcdserver: leader changed")
    with pytest.raises(LaunchError, match="leader changed") as caught:
        await launcher.launch(worker_run())
    assert caught.value.transient is True
    assert sum(r.method == "POST" for r in k8s_emulator.requests) == 2


async def test_lost_reply_then_409_counts_as_launched(
    k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator
) -> None:
    # The first create takes effect but its reply is a 500; the retry meets 409 AlreadyExists.
    k8s_emulator.inject(500, method="POST", after=True)
    handle = await k8s_launcher.launch(worker_run())
    assert [r.status for r in k8s_emulator.requests if r.method == "POST"] == [500, 409]
    assert len(k8s_emulator.jobs()) == 1
    await health_becomes(k8s_launcher, handle, HealthStatus.SUCCESS)


async def test_409_from_another_run_is_refused(k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator) -> None:
    run = worker_run(SLEEP)
    await k8s_launcher.launch(run)
    # Another run's Job holds the name (as if two run ids squashed to the same name).
    k8s_emulator.store.update(
        "Job",
        "default",
        job_name(run.run_id, 1),
        lambda job: job["metadata"]["annotations"].update({"runherd/run_id": "someone-else"}),
    )
    with pytest.raises(LaunchError, match="belongs to run someone-else attempt 1") as caught:
        await k8s_launcher.launch(run)
    assert caught.value.transient is False
    assert "(HTTP 409): " in str(caught.value) and "already exists" in str(caught.value)  # the API's words


async def test_403_is_a_launch_error_with_the_api_message(
    k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator
) -> None:
    message = (
        'jobs.batch is forbidden: User "system:serviceaccount:runherd:launcher" cannot create '
        'resource "jobs" in API group "batch" in the namespace "default"'
    )
    k8s_emulator.inject(403, method="POST", message=message)
    with pytest.raises(LaunchError) as caught:
        await k8s_launcher.launch(worker_run())
    assert message in str(caught.value)
    assert caught.value.transient is False
    assert sum(r.method == "POST" for r in k8s_emulator.requests) == 1  # not retried


async def test_api_errors_give_unknown_health(k8s_launcher: KubernetesLauncher, k8s_emulator: K8sEmulator) -> None:
    handle = await k8s_launcher.launch(worker_run([PY, "-c", "raise SystemExit(1)"]))
    await health_becomes(k8s_launcher, handle, HealthStatus.FAILED)
    k8s_emulator.inject(500, method="GET", path="/jobs/")
    health = await k8s_launcher.check_health(handle)
    assert health.status == HealthStatus.UNKNOWN
    assert "injected failure" in (health.message or "")


# --- debug info and config --------------------------------------------------------------------


async def test_debug_info_has_the_log_tail_and_events(k8s_launcher: KubernetesLauncher) -> None:
    script = (
        "import sys\n"
        "for i in range(200): print(f'line {i}')\n"
        "sys.stdout.flush()  # stdout is a pipe: keep the lines in order with stderr\n"
        "print('boom: database unreachable', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    handle = await k8s_launcher.launch(worker_run([PY, "-c", script]))
    await health_becomes(k8s_launcher, handle, HealthStatus.FAILED)
    info = await k8s_launcher.debug_info(handle)
    assert "boom: database unreachable" in info
    assert "line 199" in info
    assert "line 100\n" not in info  # a tail, not the whole log
    assert "Started" in info  # the pod's events


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({}, "image"),
        ({"image": "x", "imagee": "typo"}, "imagee"),
        ({"image": 3}, "image"),
        ({"image": "x", "namespace": 7}, "namespace"),
        ({"image": "x", "env": {"A": {"nested": 1}}}, "env"),
        ({"image": "x", "env_from_secrets": "creds"}, "env_from_secrets"),
        ({"image": "x", "resources": {"limit": {}}}, "resources"),
        ({"image": "x", "tolerations": ["x"]}, "tolerations"),
        ({"image": "x", "ttl_seconds_after_finished": "1h"}, "ttl_seconds_after_finished"),
        ({"image": "x", "load_incluster_config": "yes"}, "load_incluster_config"),
        ({"image": "x", "launch_retries": True}, "launch_retries"),
        ({"image": "x", "command": "runherd worker"}, "command"),
        ({"image": "x", "labels": {"team": "data science"}}, "labels.team"),
        ({"image": "x", "load_incluster_config": True, "context": "c"}, "load_incluster_config"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        KubernetesLauncher(config)


def test_job_names_are_dns_labels() -> None:
    run_id = "3f2a9c1e-1234-4cde-9abc-0123456789ab"
    assert job_name(run_id, 2) == f"runherd-{run_id}-2"
    for odd in ("My_Run.ID", "x" * 200, "--", "Ünïcode run"):
        name = job_name(odd, 12)
        assert len(name) <= 63 and name == name.lower() and name[-1].isalnum()
    assert job_name("run_1", 1) != job_name("run-1", 1)


async def test_only_a_launcher_executor_worker_gets_the_step_jobs_service_account(
    k8s_launcher_factory: LauncherFactory, k8s_emulator: K8sEmulator
) -> None:
    launcher = k8s_launcher_factory(
        service_account_name="runherd-worker", step_jobs_service_account_name="runherd-step-launcher"
    )
    accounts = {}
    for executor in ("multiprocess", "launcher"):
        run = WorkerRun(run_id=str(uuid.uuid4()), attempt=1, job="sa", env={}, command=["true"], executor=executor)
        handle = await launcher.launch(run)
        job = k8s_emulator.job(handle["job_name"])
        assert job is not None
        accounts[executor] = job["spec"]["template"]["spec"]["serviceAccountName"]
    assert accounts == {"multiprocess": "runherd-worker", "launcher": "runherd-step-launcher"}
