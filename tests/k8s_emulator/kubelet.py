"""A test kubelet plus Job controller: each Job's container runs as a real local subprocess.

It plays the parts of the cluster the launcher observes: it creates the Job's Pod, "schedules" it
against one fake node (a nodeSelector the node lacks leaves it Pending/Unschedulable), "pulls" the
image (an image whose name contains ``missing`` ends in ImagePullBackOff), runs ``command + args``
with the container env, records stdout+stderr for the log endpoint, writes Pod and Job status when
the process exits, enforces activeDeadlineSeconds and ttlSecondsAfterFinished, and kills the
process when the Pod or Job is deleted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import os
import secrets as _secrets
import shutil
import signal
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from .store import ApiError, Obj, Store, now_rfc3339

log = logging.getLogger(__name__)

NODE_NAME = "emulator-node"
DEFAULT_NODE_LABELS = {
    "kubernetes.io/hostname": NODE_NAME,
    "kubernetes.io/os": "linux",
    "pool": "batch",
}


class _CantStart(Exception):
    """The container cannot be created (a missing secret...): the Pod stays Waiting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(eq=False)
class PodRuntime:
    """What the kubelet knows about one Pod beyond its API object."""

    namespace: str
    pod_name: str
    job_name: str
    proc: asyncio.subprocess.Process | None = None
    log: bytearray = field(default_factory=bytearray)
    oom: bool = False
    deleting: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    volumes_dir: str | None = None  # where this pod's secret volumes are materialised


class Kubelet:
    def __init__(
        self,
        store: Store,
        *,
        node_labels: dict[str, str] | None = None,
        max_grace_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.node_labels = dict(DEFAULT_NODE_LABELS if node_labels is None else node_labels)
        # Kubernetes' default grace is 30 s; tests must not wait that long for a SIGKILL.
        self.max_grace_seconds = max_grace_seconds
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        # How long a pod waits for a Secret its volume names (the real kubelet retries the mount).
        self.volume_wait_seconds = 30.0
        self.pods: dict[tuple[str, str], PodRuntime] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lookups for tests -------------------------------------------------------------------

    def runtime_for_job(self, namespace: str, job_name: str) -> PodRuntime | None:
        for rt in self.pods.values():
            if rt.namespace == namespace and rt.job_name == job_name:
                return rt
        return None

    # --- entry points called by the API server -----------------------------------------------

    def job_created(self, namespace: str, job: Obj) -> None:
        self._spawn(self._run_job(namespace, job))
        deadline = job["spec"].get("activeDeadlineSeconds")
        if deadline is not None:
            self._spawn(self._enforce_deadline(namespace, job["metadata"]["name"], deadline))

    def delete_job(self, namespace: str, name: str, policy: str) -> Obj:
        job = self.store.get("Job", namespace, name)
        if policy == "Foreground":
            # The Job stays, marked, until its pods are gone; then the GC removes it.
            job = self.store.update("Job", namespace, name, _mark_foreground_deletion)
            self._spawn(self._delete_pods_then_job(namespace, name))
        else:
            self.store.delete("Job", namespace, name)
            self._collect_owned(namespace, job)
            if policy != "Orphan":
                self._spawn(self._delete_pods_then_job(namespace, name))
        return job

    def delete_pod(self, namespace: str, name: str, grace: float | None) -> Obj:
        pod = self.store.get("Pod", namespace, name)
        self._spawn(self._delete_pod(namespace, name, grace))
        return pod

    async def oom_kill(self, namespace: str, job_name: str) -> None:
        """Test hook: the kernel OOM killer strikes the Job's container (SIGKILL, OOMKilled)."""
        rt = self.runtime_for_job(namespace, job_name)
        if rt is None or rt.proc is None:
            raise LookupError(f"no running container for Job {job_name}")
        rt.oom = True
        with contextlib.suppress(ProcessLookupError):
            rt.proc.kill()

    async def stop(self) -> None:
        for rt in self.pods.values():
            if rt.proc is not None and rt.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    rt.proc.kill()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rt in self.pods.values():
            if rt.proc is not None and rt.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    await rt.proc.wait()

    # --- volumes ------------------------------------------------------------------------------

    async def _mount_volumes(self, ns: str, pod: Obj, rt: PodRuntime) -> dict[str, str]:
        """Secret volumes as local directories (mode as asked), waiting for a Secret that is not
        there yet like the kubelet's mount retries. Returns mountPath -> local directory."""
        container = pod["spec"]["containers"][0]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            source = (volumes.get(mount["name"]) or {}).get("secret")
            if source is None:
                continue
            secret = await self._wait_for_secret(ns, source["secretName"])
            if rt.volumes_dir is None:
                rt.volumes_dir = tempfile.mkdtemp(prefix=f"k8s-emulator-{rt.pod_name}-")
            local = os.path.join(rt.volumes_dir, mount["name"])
            os.makedirs(local, exist_ok=True)
            for key, value in (secret.get("data") or {}).items():
                path = os.path.join(local, key)
                with open(path, "wb") as f:
                    f.write(base64.b64decode(value))
                os.chmod(path, source.get("defaultMode", 0o644))
            mounts[mount["mountPath"]] = local
        return mounts

    async def _wait_for_secret(self, ns: str, name: str) -> Obj:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.volume_wait_seconds
        while (secret := self.store.find("Secret", ns, name)) is None:
            if loop.time() > deadline:
                raise _CantStart("ContainerCreating", f'MountVolume.SetUp failed: secret "{name}" not found')
            await asyncio.sleep(0.02)
        return secret

    def _collect_owned(self, ns: str, job: Obj) -> None:
        """The garbage collector: Secrets owned by a deleted Job go with it."""
        uid = job["metadata"].get("uid")
        for secret in self.store.list("Secret", ns)[0]:
            owners = secret["metadata"].get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                with contextlib.suppress(ApiError):
                    self.store.delete("Secret", ns, secret["metadata"]["name"])

    # --- the Job's life ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("emulator kubelet task failed", exc_info=task.exception())

    async def _run_job(self, ns: str, job: Obj) -> None:
        job_name = job["metadata"]["name"]
        pod = _pod_from_template(job, f"{job_name}-{_secrets.token_hex(3)[:5]}")
        pod_name = pod["metadata"]["name"]
        self.store.create("Pod", ns, pod)
        rt = PodRuntime(ns, pod_name, job_name)
        self.pods[(ns, pod_name)] = rt
        self.store.update("Job", ns, job_name, _job_started)
        self._event(ns, "Job", job_name, "Normal", "SuccessfulCreate", f"Created pod: {pod_name}")
        try:
            await self._start_container(ns, pod, rt)
        finally:
            rt.exited.set()
            if rt.volumes_dir is not None:
                shutil.rmtree(rt.volumes_dir, ignore_errors=True)

    async def _start_container(self, ns: str, pod: Obj, rt: PodRuntime) -> None:
        pod_name = pod["metadata"]["name"]
        if not self._schedule(ns, pod):
            return
        container = pod["spec"]["containers"][0]
        if "missing" in container["image"]:
            await self._image_pull_backoff(ns, pod_name, container)
            return
        try:
            mounts = await self._mount_volumes(ns, pod, rt)
            env = self._container_env(ns, pod_name, container)
        except _CantStart as exc:
            self._set_waiting(ns, pod_name, container["name"], exc.reason, exc.message)
            self._event(ns, "Pod", pod_name, "Warning", "Failed", f"Error: {exc.message}")
            return
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        # The container's mount paths are local directories here: its env and argv are rewritten.
        env = {k: _remap(v, mounts) for k, v in env.items()}
        argv = [_remap(a, mounts) for a in argv]
        try:
            rt.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._container_finished(rt, container["name"], 128, "StartError", str(exc))
            return
        self._set_running(ns, pod_name, container["name"])
        for reason, message in (
            ("Pulled", f'Container image "{container["image"]}" already present on machine'),
            ("Created", f"Created container {container['name']}"),
            ("Started", f"Started container {container['name']}"),
        ):
            self._event(ns, "Pod", pod_name, "Normal", reason, message)
        await self._collect(rt, container["name"])

    async def _collect(self, rt: PodRuntime, container_name: str) -> None:
        assert rt.proc is not None and rt.proc.stdout is not None
        while chunk := await rt.proc.stdout.read(65536):
            rt.log.extend(chunk)
        code = await rt.proc.wait()
        if rt.deleting:
            return  # the deletion flow removes the Pod; a deleted Pod writes no final status
        exit_code = code if code >= 0 else 128 - code
        reason = "OOMKilled" if rt.oom else ("Completed" if exit_code == 0 else "Error")
        self._container_finished(rt, container_name, exit_code, reason, None)

    def _container_finished(
        self, rt: PodRuntime, container: str, exit_code: int, reason: str, message: str | None
    ) -> None:
        ns, pod_name = rt.namespace, rt.pod_name
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "finishedAt": now_rfc3339(),
            "containerID": f"emulator://{pod_name}",
        }
        if message:
            terminated["message"] = message

        def pod_done(pod: Obj) -> None:
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            pod["status"]["containerStatuses"] = [
                _container_status(container, pod, {"terminated": terminated}, ready=False)
            ]

        self.store.update("Pod", ns, pod_name, pod_done)
        if exit_code == 0:
            self._finish_job(ns, rt.job_name, succeeded=True)
        else:
            self._finish_job(
                ns,
                rt.job_name,
                succeeded=False,
                reason="BackoffLimitExceeded",
                message="Job has reached the specified backoff limit",
            )

    def _finish_job(
        self,
        ns: str,
        name: str,
        *,
        succeeded: bool,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        job = self.store.find("Job", ns, name)
        if job is None or job["metadata"].get("deletionTimestamp") or _job_finished(job):
            return
        self.store.update("Job", ns, name, _job_outcome(succeeded, reason, message))
        kind, why = ("Normal", "Completed") if succeeded else ("Warning", reason or "Failed")
        self._event(ns, "Job", name, kind, why, message or "Job completed")
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is not None and ttl <= 60:  # the TTL controller; long TTLs never fire in tests
            self._spawn(self._expire(ns, name, ttl))

    # --- controllers -------------------------------------------------------------------------

    async def _enforce_deadline(self, ns: str, name: str, seconds: int) -> None:
        await asyncio.sleep(seconds)
        job = self.store.find("Job", ns, name)
        if job is None or job["metadata"].get("deletionTimestamp") or _job_finished(job):
            return
        # The Job controller fails the Job first, then deletes its running pods.
        self._finish_job(
            ns,
            name,
            succeeded=False,
            reason="DeadlineExceeded",
            message="Job was active longer than specified deadline",
        )
        await self._delete_job_pods(ns, name)

    async def _expire(self, ns: str, name: str, ttl: int) -> None:
        await asyncio.sleep(ttl)
        with contextlib.suppress(ApiError):
            self.delete_job(ns, name, "Background")

    async def _delete_pods_then_job(self, ns: str, name: str) -> None:
        await self._delete_job_pods(ns, name)
        if (job := self.store.find("Job", ns, name)) and job["metadata"].get("deletionTimestamp"):
            self.store.delete("Job", ns, name)
            self._collect_owned(ns, job)

    async def _delete_job_pods(self, ns: str, job_name: str) -> None:
        pods, _ = self.store.list("Pod", ns, f"job-name={job_name}")
        await asyncio.gather(*(self._delete_pod(ns, p["metadata"]["name"], None) for p in pods))

    async def _delete_pod(self, ns: str, pod_name: str, grace: float | None) -> None:
        pod = self.store.find("Pod", ns, pod_name)
        if pod is None:
            return
        if not pod["metadata"].get("deletionTimestamp"):
            self.store.update("Pod", ns, pod_name, _mark_deleted)
        rt = self.pods.get((ns, pod_name))
        if rt is not None:
            rt.deleting = True
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            await _stop_process(rt, min(float(grace), self.max_grace_seconds))
        with contextlib.suppress(ApiError):
            self.store.delete("Pod", ns, pod_name)
        job = self.store.find("Job", ns, pod["metadata"]["labels"]["job-name"])
        if job is not None and not job["metadata"].get("deletionTimestamp"):
            # backoffLimit 0: a pod deleted while running fails its Job.
            self._finish_job(
                ns,
                job["metadata"]["name"],
                succeeded=False,
                reason="BackoffLimitExceeded",
                message="Job has reached the specified backoff limit",
            )

    # --- pod states --------------------------------------------------------------------------

    def _schedule(self, ns: str, pod: Obj) -> bool:
        pod_name = pod["metadata"]["name"]
        wanted = pod["spec"].get("nodeSelector") or {}
        if all(self.node_labels.get(k) == v for k, v in wanted.items()):
            self.store.update("Pod", ns, pod_name, _scheduled)
            self._event(ns, "Pod", pod_name, "Normal", "Scheduled", f"Assigned to {NODE_NAME}", "scheduler")
            return True
        message = (
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
            "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
        )
        self.store.update("Pod", ns, pod_name, _unschedulable(message))
        self._event(ns, "Pod", pod_name, "Warning", "FailedScheduling", message, "scheduler")
        return False

    async def _image_pull_backoff(self, ns: str, pod_name: str, container: Obj) -> None:
        image = container["image"]
        pull_error = (
            f'Failed to pull image "{image}": rpc error: code = NotFound desc = '
            f"failed to pull and unpack image: {image}: not found"
        )
        self._event(ns, "Pod", pod_name, "Normal", "Pulling", f'Pulling image "{image}"')
        self._set_waiting(ns, pod_name, container["name"], "ErrImagePull", pull_error)
        self._event(ns, "Pod", pod_name, "Warning", "Failed", pull_error)
        await asyncio.sleep(0.05)  # the kubelet's first back-off, shortened
        if self.store.find("Pod", ns, pod_name) is None:
            return
        backoff = f'Back-off pulling image "{image}"'
        self._set_waiting(ns, pod_name, container["name"], "ImagePullBackOff", backoff)
        self._event(ns, "Pod", pod_name, "Normal", "BackOff", backoff)

    def _set_waiting(self, ns: str, pod_name: str, container: str, reason: str, msg: str) -> None:
        def waiting(pod: Obj) -> None:
            state = {"waiting": {"reason": reason, "message": msg}}
            pod["status"]["containerStatuses"] = [_container_status(container, pod, state)]

        self.store.update("Pod", ns, pod_name, waiting)

    def _set_running(self, ns: str, pod_name: str, container: str) -> None:
        def running(pod: Obj) -> None:
            pod["status"]["phase"] = "Running"
            pod["status"]["startTime"] = now_rfc3339()
            state = {"running": {"startedAt": now_rfc3339()}}
            pod["status"]["containerStatuses"] = [_container_status(container, pod, state, ready=True)]

        self.store.update("Pod", ns, pod_name, running)

    def _container_env(self, ns: str, pod_name: str, container: Obj) -> dict[str, str]:
        # What an image would bring: a PATH (the host's, so tests can run `python`/`sh`).
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod_name}
        for source in container.get("envFrom") or []:
            ref = (source.get("secretRef") or {}).get("name")
            if ref is None:
                continue
            data = self.secrets.get((ns, ref))
            if data is None:
                raise _CantStart("CreateContainerConfigError", f'secret "{ref}" not found')
            env.update(data)
        for var in container.get("env") or []:
            env[var["name"]] = str(var.get("value", ""))
        return env

    def _event(
        self,
        ns: str,
        kind: str,
        name: str,
        etype: str,
        reason: str,
        message: str,
        component: str = "kubelet",
    ) -> None:
        obj = self.store.find(kind, ns, name)
        uid = obj["metadata"]["uid"] if obj else ""
        ts = now_rfc3339()
        self.store.create(
            "Event",
            ns,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.{_secrets.token_hex(8)}"},
                "involvedObject": {"kind": kind, "namespace": ns, "name": name, "uid": uid},
                "type": etype,
                "reason": reason,
                "message": message,
                "source": {"component": "job-controller" if kind == "Job" else component},
                "firstTimestamp": ts,
                "lastTimestamp": ts,
                "count": 1,
            },
        )


# --- pure helpers on API objects ---------------------------------------------------------------


def _remap(value: str, mounts: dict[str, str]) -> str:
    for mount_path, local in mounts.items():
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return local + value[len(mount_path.rstrip("/")) :]
    return value


async def _stop_process(rt: PodRuntime, grace: float) -> None:
    """SIGTERM, then SIGKILL after the grace period, like the kubelet's container stop."""
    proc = rt.proc
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(rt.exited.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await rt.exited.wait()


def _pod_from_template(job: Obj, pod_name: str) -> Obj:
    meta, template = job["metadata"], job["spec"]["template"]
    uid, job_name = meta["uid"], meta["name"]
    labels = dict(template.get("metadata", {}).get("labels") or {})
    labels.update(
        {
            "job-name": job_name,
            "batch.kubernetes.io/job-name": job_name,
            "controller-uid": uid,
            "batch.kubernetes.io/controller-uid": uid,
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job_name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": copy.deepcopy(template.get("spec") or {}),
        "status": {"phase": "Pending", "conditions": []},
    }


def _container_status(name: str, pod: Obj, state: Obj, *, ready: bool = False) -> Obj:
    image = pod["spec"]["containers"][0]["image"]
    return {"name": name, "image": image, "ready": ready, "restartCount": 0, "state": state}


def _job_finished(job: Obj) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in job.get("status", {}).get("conditions") or []
    )


def _job_started(job: Obj) -> None:
    job.setdefault("status", {}).update(active=1, startTime=now_rfc3339())


def _job_outcome(succeeded: bool, reason: str | None, message: str | None) -> Any:
    def apply(job: Obj) -> None:
        status = job.setdefault("status", {})
        status.pop("active", None)
        ts = now_rfc3339()
        if succeeded:
            status.update(succeeded=1, completionTime=ts)
            interim, final, reason_ = "SuccessCriteriaMet", "Complete", "CompletionsReached"
        else:
            status.update(failed=1)
            interim, final, reason_ = "FailureTarget", "Failed", reason
        status["conditions"] = [
            {
                "type": t,
                "status": "True",
                "reason": reason_,
                "message": message or "",
                "lastProbeTime": ts,
                "lastTransitionTime": ts,
            }
            for t in (interim, final)
        ]

    return apply


def _mark_foreground_deletion(job: Obj) -> None:
    job["metadata"]["deletionTimestamp"] = now_rfc3339()
    job["metadata"]["finalizers"] = ["foregroundDeletion"]


def _mark_deleted(pod: Obj) -> None:
    pod["metadata"]["deletionTimestamp"] = now_rfc3339()


def _scheduled(pod: Obj) -> None:
    pod["spec"]["nodeName"] = NODE_NAME
    pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]


def _unschedulable(message: str) -> Any:
    def apply(pod: Obj) -> None:
        pod["status"]["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": now_rfc3339(),
            }
        ]

    return apply
