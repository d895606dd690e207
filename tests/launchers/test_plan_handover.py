"""Issue 8 item 6: the plan reaches the worker as a file on every launcher, whatever its size.

A resumed attempt carries every completed step's output in its plan; in the environment that
failed past Linux's 128 KiB per variable ("Argument list too long"). Each launcher here starts a
worker whose plan holds 1.2 MB of completed outputs (incompressible), and the worker checks it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import sys
import uuid
from pathlib import Path

import aiodocker
import orjson

from runherd.contract import parse_steps
from runherd.errors import LaunchError
from runherd.launchers.base import WorkerRun
from runherd.launchers.kubernetes import KubernetesLauncher
from runherd.launchers.process import ProcessLauncher
from runherd.plan import Plan
from tests.harness import eventually
from tests.launchers import k8s_fixtures
from tests.launchers.docker_fixtures import ExitCollector, make_launcher

k8s_emulator = k8s_fixtures.k8s_emulator
k8s_kubeconfig = k8s_fixtures.k8s_kubeconfig
k8s_launcher_factory = k8s_fixtures.k8s_launcher_factory
k8s_launcher = k8s_fixtures.k8s_launcher

PY = sys.executable
COMPLETED_BYTES = 1_200_000  # more than 1 MiB in all, two outputs under the 1 MiB limit each

# The worker side: read the plan the way `runherd worker` does and prove it arrived whole.
CHECK = """
import hashlib, os, stat, sys
from runherd.plan import from_env
assert "RUNHERD_PLAN" not in os.environ, "the plan must not travel in the environment"
plan = from_env()
data = "".join(plan.completed[k] for k in sorted(plan.completed)).encode()
mode = stat.S_IMODE(os.stat(os.environ["RUNHERD_PLAN_FILE"]).st_mode)
print(f"plan ok bytes={len(data)} sha={hashlib.sha256(data).hexdigest()} mode={mode:o} worker={plan.worker_id}")
sys.exit(0 if len(data) == int(sys.argv[1]) else 5)
"""


def big_run(command: list[str] | None = None) -> tuple[WorkerRun, str]:
    half = COMPLETED_BYTES // 2
    completed = {"a": os.urandom(half // 2).hex(), "b": os.urandom(half // 2).hex()}
    run_id = str(uuid.uuid4())
    plan = Plan(
        run_id=run_id,
        attempt=2,
        job="resume-big",
        steps=parse_steps(
            [
                {"key": "a", "command": ["true"]},
                {"key": "b", "command": ["true"]},
                {"key": "c", "command": ["true"], "deps": ["a", "b"]},
            ]
        ),
        completed=completed,
        worker_id="w-big",
    )
    digest = hashlib.sha256((completed["a"] + completed["b"]).encode()).hexdigest()
    run = WorkerRun(
        run_id=run_id,
        attempt=2,
        job="resume-big",
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        command=command or [PY, "-c", CHECK, str(COMPLETED_BYTES)],
        plan=plan.to_json(),
        worker_id="w-big",
    )
    assert len(run.plan) > 128 * 1024 * 8  # far past what one environment variable can hold
    return run, digest


async def test_process_hands_a_1_2_mb_plan_over_as_a_private_file(tmp_path: Path) -> None:
    launcher = ProcessLauncher({"log_dir": str(tmp_path)})
    run, digest = big_run()
    try:
        handle = await launcher.launch(run)
        exit_ = await anext(launcher.watch())
        log = await launcher.debug_info(handle)
        assert exit_.exit_code == 0, log
        assert f"bytes={COMPLETED_BYTES} sha={digest} mode=600 worker=w-big" in log
        # Read once at the start: the plan file goes with the worker.
        assert not (tmp_path / run.run_id / "attempt-2.plan.json").exists()
    finally:
        await launcher.close()


async def test_docker_puts_a_1_2_mb_plan_into_the_container(docker_engine: aiodocker.Docker) -> None:
    launcher = await make_launcher()
    exits = ExitCollector(launcher)
    run, digest = big_run()
    try:
        handle = await launcher.launch(run)
        exit_ = await exits.wait_for(run.run_id, within=60)
        log = await launcher.debug_info(handle)
        assert exit_.exit_code == 0, log
        assert f"bytes={COMPLETED_BYTES} sha={digest} mode=444 worker=w-big" in log
        spec = await docker_engine.containers.container(handle["container_id"]).show()
        env = spec["Config"]["Env"]
        assert "RUNHERD_PLAN_FILE=/.runherd/plan.json" in env
        assert sum(len(v) for v in env) < 64 * 1024  # the plan is not in the environment
    finally:
        await exits.stop()
        await launcher.close()


async def test_kubernetes_mounts_a_1_2_mb_plan_from_a_secret_owned_by_the_job(
    k8s_launcher: KubernetesLauncher, k8s_emulator: k8s_fixtures.K8sEmulator
) -> None:
    exits = k8s_launcher.watch()
    assert exits is not None
    run, digest = big_run()
    handle = await k8s_launcher.launch(run)
    name = handle["job_name"]
    secret = k8s_emulator.store.find("Secret", "default", name)
    assert secret is not None
    job = k8s_emulator.job(name)
    assert job is not None
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    # gzip: random hex halves; the Secret stays under the API's 1 MiB
    assert len(base64.b64decode(secret["data"]["plan.json"])) < 1024 * 1024
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "RUNHERD_PLAN" not in env and env["RUNHERD_PLAN_FILE"] == "/var/run/runherd/plan.json"

    exit_ = await k8s_fixtures.wait_for(lambda: anext(exits), 20, "the worker's exit")
    log = await k8s_launcher.debug_info(handle)
    assert exit_.exit_code == 0, log
    assert f"bytes={COMPLETED_BYTES} sha={digest} mode=444 worker=w-big" in log
    # The garbage collector deletes the Secret with its Job.
    assert await k8s_launcher.terminate(handle) is True
    await eventually(lambda: k8s_emulator.store.find("Secret", "default", name) is None, what="the Secret gone")
    await exits.aclose()


async def test_kubernetes_refuses_a_plan_over_the_secret_limit(k8s_launcher: KubernetesLauncher) -> None:
    """Past what a Secret can hold even compressed, the launch fails saying so (not a hang)."""
    run, _ = big_run()
    plan = orjson.loads(run.plan)
    # 1.2 MB of base64 of random bytes: about 0.9 MB gzipped each half, 1.8 MB in all
    plan["completed"] = {k: base64.b64encode(os.urandom(900_000)).decode() for k in ("a", "b")}
    oversized = dataclasses.replace(run, plan=orjson.dumps(plan).decode())
    try:
        await k8s_launcher.launch(oversized)
    except LaunchError as exc:
        assert "a Kubernetes Secret holds at most 1048576" in str(exc)
    else:
        raise AssertionError("an oversized plan was launched")


async def test_kubernetes_a_launch_cut_between_job_and_secret_is_completed_by_the_next(
    k8s_launcher: KubernetesLauncher, k8s_emulator: k8s_fixtures.K8sEmulator
) -> None:
    """A launcher that dies (here: fails) after creating the Job and before its Secret: the pod
    waits for its volume, and the next launch of the attempt adopts the Job and adds the Secret."""
    exits = k8s_launcher.watch()
    assert exits is not None
    run, digest = big_run()
    k8s_emulator.inject(500, times=100, method="POST", path="/secrets$")
    try:
        await k8s_launcher.launch(run)
    except LaunchError as exc:
        assert "plan Secret" in str(exc)
    else:
        raise AssertionError("the Secret's creation was meant to fail")
    k8s_emulator.server.injections.clear()
    handle = await k8s_launcher.launch(run)
    exit_ = await k8s_fixtures.wait_for(lambda: anext(exits), 20, "the worker's exit")
    log = await k8s_launcher.debug_info(handle)
    assert exit_.exit_code == 0 and f"sha={digest}" in log, log
    assert len(k8s_emulator.jobs()) == 1 and len(k8s_emulator.pods(handle["job_name"])) == 1
    await exits.aclose()
