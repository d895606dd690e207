"""The ``launcher`` executor on Kubernetes: each try of a step in a Job of its own.

The run's worker (whose pod has the API access of ``step_jobs_service_account_name``) creates one
Job per step try through the same client config as the launcher's, from the same launcher config
(image, namespace, env, resources, the workers' service account, which has no API access, ...),
named ``runherd-step-<hash of run id and step key>-<try>`` and labelled with the run id, the
attempt that started it, the step and the try (the exact run id and step key in annotations). Its
container runs ``python -m runherd.worker.detached <spec> -``: the step and its inputs come from a
Secret owned by the Job (as the worker's plan does: gzip, mounted read-only), and the result is
the last line of the pod's log that starts with ``RUNHERD_STEP_RESULT `` (the log is the one
channel from a pod back that needs no API access of its own).

The name is the step try's identity: a resumed attempt finds a running Job by it and waits for it
(the API refuses a second Job of that name), takes the result of one that finished, and starts
afresh (deleting the old Job) only when one that ended left no result.

``reap`` is what the launcher's terminate does after deleting a worker's Job: it deletes the run's
unfinished step Jobs unless a newer attempt's worker Job is active (that one has adopted them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kubernetes_asyncio.client.exceptions import ApiException

from runherd.launchers.base import WorkerRun
from runherd.launchers.kubernetes.api_errors import TRANSPORT_ERRORS
from runherd.launchers.kubernetes.health import _finished_condition
from runherd.launchers.kubernetes.job import (
    ANNOTATION_RUN_ID,
    CONTAINER_NAME,
    LABEL_ATTEMPT,
    LABEL_RUN_ID,
    PLAN_KEY,
    PLAN_MOUNT_PATH,
    build_job,
    label_value,
    plan_secret,
)
from runherd.plan import compress

if TYPE_CHECKING:
    from runherd.launchers.kubernetes.launcher import KubernetesLauncher

LABEL_STEP = "runherd/step"
LABEL_STEP_TRY = "runherd/step_try"
ANNOTATION_STEP_KEY = "runherd/step_key"
RESULT_MARKER = "RUNHERD_STEP_RESULT "
POLL_SECONDS = 0.25
LOG_TAIL_LINES = 50  # the result is printed last; a few lines of slack for a runtime's own


def step_job_name(run_id: str, step_key: str, try_: int) -> str:
    """A DNS-1123 name, the same for the same try of the same step of the same run."""
    digest = hashlib.sha256(f"{run_id}\0{step_key}".encode()).hexdigest()[:24]
    return f"runherd-step-{digest}-{try_}"


def build_step_job(
    cfg: Mapping[str, Any],
    *,
    run_id: str,
    attempt: int,
    job: str,
    step_key: str,
    try_: int,
    env: Mapping[str, str],
    python: str,
) -> dict[str, Any]:
    """The Job of one step try: the worker's own manifest, its command the detached step reading its
    spec from the Secret's mount, its environment the step's (built by the worker)."""
    spec_path = f"{PLAN_MOUNT_PATH}/{PLAN_KEY}"
    command = [python, "-m", "runherd.worker.detached", spec_path, "-"]
    # ``plan`` only to have build_job mount the Secret (the step's spec) as it mounts a plan.
    run = WorkerRun(run_id=run_id, attempt=attempt, job=job, env=dict(env), command=command, plan="-")
    body = build_job({**cfg, "env": {}}, run, step_job_name(run_id, step_key, try_))
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": str(v)} for k, v in env.items()]  # the step's alone
    labels = {LABEL_STEP: label_value(step_key), LABEL_STEP_TRY: str(try_)}
    body["metadata"]["labels"].update(labels)
    body["spec"]["template"]["metadata"]["labels"].update(labels)
    body["metadata"]["annotations"][ANNOTATION_STEP_KEY] = step_key
    return body


def result_from_log(text: str) -> dict[str, Any] | None:
    """The last result line of a step pod's log, or None: the step printed none."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                got = json.loads(line[len(RESULT_MARKER) :])
            except ValueError:
                return None
            return got if isinstance(got, dict) else None
    return None


def _active(job: Mapping[str, Any]) -> bool:
    return _finished_condition(job) is None and not (job.get("metadata") or {}).get("deletionTimestamp")


def reap_decision(jobs: list[dict[str, Any]], run_id: str, attempt: int | None) -> list[str]:
    """Pure: the step Jobs of ``run_id`` to delete: its unfinished ones, unless a worker Job of an
    attempt newer than ``attempt`` is active (it has adopted them, or will)."""
    steps, newer = [], False
    for job in jobs:
        meta = job.get("metadata") or {}
        labels = meta.get("labels") or {}
        if (meta.get("annotations") or {}).get(ANNOTATION_RUN_ID) != run_id or not _active(job):
            continue
        if LABEL_STEP in labels:
            steps.append(str(meta.get("name")))
        elif attempt is not None and str(labels.get(LABEL_ATTEMPT, "")).isdigit():
            newer = newer or int(labels[LABEL_ATTEMPT]) > attempt
    return [] if newer else steps


async def reap(launcher: KubernetesLauncher, run_id: str, attempt: int | None) -> list[str]:
    """Delete the run's unfinished step Jobs (see ``reap_decision``); the names deleted."""
    ns = launcher.namespace
    try:
        jobs = await launcher._call("list_namespaced_job", ns, label_selector=f"{LABEL_RUN_ID}={label_value(run_id)}")
    except (ApiException, *TRANSPORT_ERRORS):
        return []
    names = reap_decision(list(jobs.get("items") or []), run_id, attempt)
    for name in names:
        with contextlib.suppress(Exception):
            await launcher.terminate({"namespace": ns, "job_name": name}, grace_seconds=0)
    return names


class StepJob:
    """One try of a step in its own Job, from the worker's side: ``adopt`` takes over what an
    earlier attempt left, ``spawn`` creates it, ``wait`` gives its result, ``stop`` deletes it."""

    def __init__(
        self, launcher: KubernetesLauncher, *, run_id: str, attempt: int, job: str, step_key: str, try_: int
    ) -> None:
        self.launcher = launcher
        self.run_id, self.attempt, self.job, self.step_key, self.try_ = run_id, attempt, job, step_key, try_
        self.ns = launcher.namespace
        self.name = step_job_name(run_id, step_key, try_)

    def handle(self, adopted: bool, **more: Any) -> dict[str, Any]:
        return {"namespace": self.ns, "job_name": self.name, "adopted": adopted, **more}

    async def _read(self) -> dict[str, Any] | None:
        try:
            job: dict[str, Any] = await self.launcher._call("read_namespaced_job", self.name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return job

    async def adopt(self) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """(handle, result or None while it runs) of the Job an earlier attempt started, or None:
        there is none, or it ended without a result (deleted: the try starts anew)."""
        job = await self._read()
        if job is None:
            return None
        if _active(job):
            return self.handle(True), None
        result = await self.result()
        if result is not None:
            return self.handle(True, finished=True), result
        await self.launcher.terminate({"namespace": self.ns, "job_name": self.name}, grace_seconds=0)
        for _ in range(int(30 / POLL_SECONDS)):  # gone before its name can be taken again
            if await self._read() is None:
                break
            await asyncio.sleep(POLL_SECONDS)
        return None

    async def spawn(self, spec: Mapping[str, Any], env: Mapping[str, str], python: str) -> dict[str, Any]:
        body = build_step_job(
            self.launcher.cfg,
            run_id=self.run_id,
            attempt=self.attempt,
            job=self.job,
            step_key=self.step_key,
            try_=self.try_,
            env=env,
            python=python,
        )
        try:
            created = await self.launcher._call("create_namespaced_job", self.ns, body)
        except ApiException as exc:
            if exc.status == 409:  # another worker of the run created this very try meanwhile
                found = await self.adopt()
                if found is not None:
                    return found[0]
            raise
        secret = plan_secret(created, compress(json.dumps(spec)))
        with contextlib.suppress(ApiException):  # 409: an earlier try's, which the pod reads
            await self.launcher._call("create_namespaced_secret", self.ns, secret)
        return self.handle(False)

    async def wait(self) -> tuple[dict[str, Any] | None, str]:
        """(the result, or None with why there is none) once the Job has finished."""
        while True:
            try:
                job = await self._read()
            except (ApiException, *TRANSPORT_ERRORS):
                job = {}  # the API is away for a moment: ask again
            if job is None:
                return None, f"step Job {self.name} was deleted before it finished"
            if job and not _active(job):
                break
            await asyncio.sleep(POLL_SECONDS)
        result = await self.result()
        if result is None:
            cond = _finished_condition(job) or {}
            return None, f"step Job {self.name} ended without a result: {cond.get('reason') or 'deleted'}"
        return result, ""

    async def result(self) -> dict[str, Any] | None:
        try:
            pod = await self.launcher._job_pod(self.ns, self.name)
            if pod is None:
                return None
            text = await self.launcher._call(
                "read_namespaced_pod_log",
                pod["metadata"]["name"],
                self.ns,
                container=CONTAINER_NAME,
                tail_lines=LOG_TAIL_LINES,
                raw=True,
            )
        except (ApiException, *TRANSPORT_ERRORS):
            return None
        return result_from_log(text)

    async def stop(self, grace: float) -> None:
        with contextlib.suppress(Exception):
            await self.launcher.terminate({"namespace": self.ns, "job_name": self.name}, grace_seconds=grace)
