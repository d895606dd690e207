"""The Kubernetes run launcher: one batch/v1 Job per run attempt, through kubernetes_asyncio.

Config (``run_launcher.config``; validated when the launcher is built, an unknown key or a wrong
type raises ConfigError naming the key):

==============================  ===========================================================
image (required)                the worker's image
command                         worker command; ``WorkerRun.command`` wins when not None
                                (default ``["runherd", "worker"]``)
namespace                       where the Jobs go (default ``default``)
service_account_name            the pods' service account
env                             {name: value}, under the run's own env
env_from_secrets                [secret name] -> ``envFrom: secretRef``
resources                       {requests: {...}, limits: {...}}
image_pull_secrets              [secret name]
image_pull_policy               Always | IfNotPresent | Never
node_selector, tolerations      as in a pod spec
labels                          extra labels on Job and pod (runherd's own labels win)
ttl_seconds_after_finished      default 3600; null: keep finished Jobs
termination_grace_seconds       the pods' terminationGracePeriodSeconds (default: Kubernetes')
load_incluster_config           use the pod's service account (default false)
kubeconfig_file, context        which kubeconfig and context (default ``~/.kube/config``)
api_url                         overrides the API server URL (tests, proxies)
launch_retries                  retries of a transient create failure (default 3)
retry_backoff_seconds           first retry delay, doubled each time (default 0.5)
request_timeout_seconds         per API call (default 30)
watch_timeout_seconds           server-side timeout of one watch request (default 300)
log_tail_lines                  lines of worker log in debug_info (default 50)
==============================  ===========================================================

Health: a Job's Complete/Failed condition decides SUCCESS/FAILED (exit code and reason from the
pod's terminated container: OOMKilled, DeadlineExceeded, StartError or Error). A container that
cannot start (ImagePullBackOff, ErrImagePull, CreateContainerConfigError...) is FAILED at once:
Kubernetes would keep the pod Pending forever. An Unschedulable pod stays RUNNING with reason
"Unschedulable" and the scheduler's message: the cluster autoscaler may still add a node, and
runherd's start timeout fails the run if it never starts. API errors give UNKNOWN, a missing Job
NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from shared.errors import ConfigError, LaunchError
from shared.launchers.base import (
    Handle,
    Health,
    HealthStatus,
    RunLauncher,
    WorkerExit,
    WorkerRun,
)

log = logging.getLogger(__name__)

CONTAINER_NAME = "runherd-worker"
LABEL_RUN_ID = "runherd/run_id"
LABEL_ATTEMPT = "runherd/attempt"
LABEL_JOB = "runherd/job"
ANNOTATION_RUN_ID = "runherd/run_id"  # the exact run id: label values are squashed
DEFAULT_COMMAND = ["runherd", "worker"]
# Waiting reasons of a container that will not start by itself (restartPolicy Never).
CANT_START = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
# Terminated reasons worth passing on as they are; any other failure is "Error".
SPECIFIC_EXIT_REASONS = frozenset({"OOMKilled", "StartError", "ContainerCannotRun"})
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)  # OSError covers TimeoutError
MAX_BACKOFF_SECONDS = 30.0

# --- config ------------------------------------------------------------------------------------

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, str) for i in v)


def _is_str_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _is_env(v: Any) -> bool:
    # YAML turns `PORT: 5432` into an int: scalars are fine, they become strings.
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, str | int | float | bool) for k, x in v.items()
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_resources(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and set(v) <= {"requests", "limits"}
        and all(
            isinstance(q, dict) and all(isinstance(k, str) and isinstance(x, str | int | float) for k, x in q.items())
            for q in v.values()
        )
    )


@dataclass(frozen=True)
class _Key:
    check: Callable[[Any], bool]
    expected: str
    default: Any = None
    required: bool = False
    nullable: bool = False


_CONFIG: dict[str, _Key] = {
    "image": _Key(lambda v: isinstance(v, str) and bool(v), "a non-empty string", required=True),
    "command": _Key(lambda v: _is_str_list(v) and bool(v), "a non-empty list of strings"),
    "namespace": _Key(lambda v: isinstance(v, str) and bool(v), "a string", "default"),
    "service_account_name": _Key(lambda v: isinstance(v, str), "a string"),
    "env": _Key(_is_env, "a mapping of names to strings", {}),
    "env_from_secrets": _Key(_is_str_list, "a list of secret names", []),
    "resources": _Key(_is_resources, "a mapping with 'requests'/'limits' mappings", {}),
    "image_pull_secrets": _Key(_is_str_list, "a list of secret names", []),
    "image_pull_policy": _Key(lambda v: v in ("Always", "IfNotPresent", "Never"), "Always, IfNotPresent or Never"),
    "node_selector": _Key(_is_str_dict, "a mapping of strings to strings", {}),
    "tolerations": _Key(
        lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v),
        "a list of mappings",
        [],
    ),
    "labels": _Key(_is_str_dict, "a mapping of strings to strings", {}),
    "ttl_seconds_after_finished": _Key(lambda v: _is_int(v) and v >= 0, "an integer >= 0", 3600, nullable=True),
    "termination_grace_seconds": _Key(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "load_incluster_config": _Key(lambda v: isinstance(v, bool), "a boolean", False),
    "kubeconfig_file": _Key(lambda v: isinstance(v, str) and bool(v), "a path"),
    "context": _Key(lambda v: isinstance(v, str) and bool(v), "a string"),
    "api_url": _Key(lambda v: isinstance(v, str) and "://" in v, "a URL"),
    "launch_retries": _Key(lambda v: _is_int(v) and v >= 0, "an integer >= 0", 3),
    "retry_backoff_seconds": _Key(lambda v: _is_number(v) and v > 0, "a number > 0", 0.5),
    "request_timeout_seconds": _Key(lambda v: _is_number(v) and v > 0, "a number > 0", 30),
    "watch_timeout_seconds": _Key(lambda v: _is_int(v) and v > 0, "an integer > 0", 300),
    "log_tail_lines": _Key(lambda v: _is_int(v) and v > 0, "an integer > 0", 50),
}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with defaults filled in; ConfigError names the first bad key."""
    for key in config:
        if key not in _CONFIG:
            raise ConfigError(f"run_launcher.config.{key}: unknown key for the kubernetes launcher")
    out: dict[str, Any] = {}
    for key, spec in _CONFIG.items():
        value = config.get(key, spec.default)
        if value is None:
            if spec.required or (key in config and not spec.nullable and spec.default is not None):
                raise ConfigError(f"run_launcher.config.{key}: required, must be {spec.expected}")
        elif not spec.check(value):
            raise ConfigError(f"run_launcher.config.{key}: must be {spec.expected}, got {value!r}")
        out[key] = value
    for name, value in out["labels"].items():
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ConfigError(f"run_launcher.config.labels.{name}: {value!r} is no label value")
    if out["load_incluster_config"] and (out["kubeconfig_file"] or out["context"]):
        raise ConfigError(
            "run_launcher.config.load_incluster_config: cannot be combined with kubeconfig_file or context"
        )
    return out


# --- names and manifests -------------------------------------------------------------------------


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def job_name(run_id: str, attempt: int) -> str:
    """``runherd-<run id>-<attempt>``, a DNS-1123 label; a hash keeps squashed ids apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-") or "run"
    suffix = f"-{attempt}"
    room = 63 - len("runherd-") - len(suffix)
    if slug != run_id or len(slug) > room:
        slug = slug[: room - 9].strip("-") + "-" + _digest(run_id)
        slug = slug.lstrip("-")
    return f"runherd-{slug}{suffix}"


def label_value(value: object) -> str:
    """Any string squashed into a valid label value (<= 63 chars, alphanumeric ends)."""
    text = str(value)
    squashed = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    if len(squashed) > 63:
        squashed = squashed[:54].rstrip("._-") + "-" + _digest(text)
    return squashed


def build_job(cfg: Mapping[str, Any], run: WorkerRun, name: str) -> dict[str, Any]:
    """The Job manifest of one run attempt."""
    labels = {
        **cfg["labels"],
        "app.kubernetes.io/managed-by": "runherd",
        LABEL_RUN_ID: label_value(run.run_id),
        LABEL_ATTEMPT: str(run.attempt),
        LABEL_JOB: label_value(run.job),
    }
    env = {**cfg["env"], **run.env}
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": cfg["image"],
        "command": list(run.command if run.command is not None else cfg["command"] or DEFAULT_COMMAND),
        "env": [{"name": k, "value": str(v)} for k, v in env.items()],
    }
    if cfg["env_from_secrets"]:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in cfg["env_from_secrets"]]
    if cfg["resources"]:
        container["resources"] = cfg["resources"]
    if cfg["image_pull_policy"]:
        container["imagePullPolicy"] = cfg["image_pull_policy"]
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    optional = {
        "serviceAccountName": cfg["service_account_name"],
        "imagePullSecrets": [{"name": s} for s in cfg["image_pull_secrets"]],
        "nodeSelector": cfg["node_selector"],
        "tolerations": cfg["tolerations"],
        "terminationGracePeriodSeconds": cfg["termination_grace_seconds"],
    }
    pod_spec.update({k: v for k, v in optional.items() if v not in (None, [], {})})
    spec: dict[str, Any] = {
        "backoffLimit": 0,  # runherd decides about retries and resumes, not the Job controller
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if cfg["ttl_seconds_after_finished"] is not None:
        spec["ttlSecondsAfterFinished"] = cfg["ttl_seconds_after_finished"]
    if run.max_runtime_seconds:
        spec["activeDeadlineSeconds"] = int(run.max_runtime_seconds)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": cfg["namespace"],
            "labels": labels,
            "annotations": {ANNOTATION_RUN_ID: run.run_id, "runherd/job": run.job},
        },
        "spec": spec,
    }


# --- reading Job and Pod status (pure) -----------------------------------------------------------


def _finished_condition(job: Mapping[str, Any]) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def _container_state(pod: Mapping[str, Any] | None) -> dict[str, Any]:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER_NAME:
            return status.get("state") or {}
    return (statuses[0].get("state") or {}) if statuses else {}


def _unschedulable(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return cond
    return None


def _exit_health(name: str, succeeded: bool, cond: Mapping[str, Any] | None, terminated: Mapping[str, Any]) -> Health:
    exit_code = terminated.get("exitCode")
    if succeeded:
        return Health(
            HealthStatus.SUCCESS,
            exit_code=0 if exit_code is None else exit_code,
            reason="Completed",
            message=f"Job {name} completed",
        )
    term_reason = terminated.get("reason")
    if cond is not None and cond.get("reason") == "DeadlineExceeded":
        reason = "DeadlineExceeded"
    else:
        reason = term_reason if term_reason in SPECIFIC_EXIT_REASONS else "Error"
    parts = [f"Job {name} failed"]
    if cond is not None and cond.get("message"):
        parts.append(str(cond["message"]))
    if exit_code is not None:
        parts.append(f"container exited with code {exit_code} ({term_reason or 'Error'})")
    return Health(HealthStatus.FAILED, exit_code=exit_code, reason=reason, message=": ".join(parts))


def health_from(job: Mapping[str, Any], pod: Mapping[str, Any] | None) -> Health:
    """How the worker is, from its Job and (the latest of) its Pod."""
    name = job.get("metadata", {}).get("name", "?")
    state = _container_state(pod)
    terminated = state.get("terminated") or {}
    cond = _finished_condition(job)
    if cond is not None:
        return _exit_health(name, cond["type"] == "Complete", cond, terminated)
    if job.get("metadata", {}).get("deletionTimestamp"):
        return Health(HealthStatus.RUNNING, reason="Terminating", message=f"Job {name} is being deleted")
    if pod is None:
        return Health(HealthStatus.RUNNING, message=f"Job {name} has no pod yet")
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in CANT_START:
        message = f"worker of Job {name} cannot start: {waiting['reason']}"
        if waiting.get("message"):
            message += f": {waiting['message']}"
        return Health(HealthStatus.FAILED, reason=waiting["reason"], message=message)
    if terminated:  # the pod is done and the Job controller has not caught up yet
        return _exit_health(name, terminated.get("exitCode") == 0, None, terminated)
    if (cond := _unschedulable(pod)) is not None:
        return Health(
            HealthStatus.RUNNING,
            reason="Unschedulable",
            message=f"pod of Job {name} cannot be scheduled: {cond.get('message', '')}",
        )
    return Health(HealthStatus.RUNNING, message=f"Job {name} is active")


def _latest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod that matters: not being deleted first, then the newest."""
    if not pods:
        return None
    return max(
        pods,
        key=lambda p: (
            not p["metadata"].get("deletionTimestamp"),
            p["metadata"].get("creationTimestamp") or "",
        ),
    )


def _api_message(exc: ApiException) -> str:
    """The API's own sentence from a Status body, else what the client knows."""
    body: str | bytes | None = exc.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body:
        try:
            status = json.loads(body)
        except ValueError:
            return str(body).strip()[:500]
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return str(exc.reason or f"HTTP {exc.status}")


def _transient(status: int | None) -> bool:
    return not status or status >= 500 or status == 429


def _signal(exit_code: int | None) -> int | None:
    # Container runtimes report death by signal N as exit code 128 + N.
    return exit_code - 128 if exit_code is not None and 128 < exit_code < 160 else None


class _Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


@dataclass(frozen=True)
class _Watched:
    run_id: str
    attempt: int
    seq: int  # when it was added: a relist only misses Jobs it was old enough to see


# --- the launcher ----------------------------------------------------------------------------------


class KubernetesLauncher(RunLauncher):
    name = "kubernetes"

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.cfg = validate_config(self.config)
        self.namespace: str = self.cfg["namespace"]
        self._client: client.ApiClient | None = None
        self._client_lock = asyncio.Lock()
        self._watched: dict[tuple[str, str], _Watched] = {}
        self._seq = 0
        self._exits: asyncio.Queue[WorkerExit] = asyncio.Queue()
        self._watching = False
        self._ns_tasks: dict[str, asyncio.Task[None]] = {}

    # --- API plumbing ------------------------------------------------------------------------

    async def _api(self) -> client.ApiClient:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._make_client()
        return self._client

    async def _make_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        cfg = self.cfg
        in_cluster = cfg["load_incluster_config"] or (
            not (cfg["kubeconfig_file"] or cfg["context"] or cfg["api_url"]) and "KUBERNETES_SERVICE_HOST" in os.environ
        )
        try:
            if in_cluster:
                k8s_config.load_incluster_config(client_configuration=configuration)
            elif cfg["kubeconfig_file"] or cfg["context"] or not cfg["api_url"]:
                await k8s_config.load_kube_config(
                    config_file=cfg["kubeconfig_file"],
                    context=cfg["context"],
                    client_configuration=configuration,
                    persist_config=False,
                )
        except (ConfigException, OSError) as exc:
            raise LaunchError(f"cannot load the Kubernetes client config: {exc}") from exc
        if cfg["api_url"]:
            configuration.host = cfg["api_url"].rstrip("/")
        return client.ApiClient(configuration=configuration)

    async def _call(self, method: str, *args: Any, raw: bool = False, **kwargs: Any) -> Any:
        """Call a BatchV1Api/CoreV1Api method by name; the JSON body as dicts (or text).

        Raw JSON rather than the client's models: the watch delivers raw objects anyway, and
        one set of helpers reads both."""
        api = await self._api()
        group = client.BatchV1Api(api) if hasattr(client.BatchV1Api, method) else client.CoreV1Api(api)
        kwargs.setdefault("_request_timeout", self.cfg["request_timeout_seconds"])
        resp = await getattr(group, method)(*args, _preload_content=False, **kwargs)
        try:
            text = await resp.text()
        finally:
            resp.release()
        if not 200 <= resp.status < 300:
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.body = text
            raise exc
        if raw:
            return text
        return json.loads(text) if text else {}

    async def _job_pod(self, ns: str, name: str) -> dict[str, Any] | None:
        pods = await self._call("list_namespaced_pod", ns, label_selector=f"job-name={name}")
        return _latest(pods.get("items") or [])

    # --- launch ----------------------------------------------------------------------------------

    async def launch(self, run: WorkerRun) -> Handle:
        name = job_name(run.run_id, run.attempt)
        body = build_job(self.cfg, run, name)
        await self._create(body, run)
        handle: Handle = {
            "launcher": self.name,
            "namespace": self.namespace,
            "job_name": name,
            "run_id": run.run_id,
            "attempt": run.attempt,
        }
        self._watch_add(handle)
        return handle

    async def _create(self, body: dict[str, Any], run: WorkerRun) -> None:
        ns, name = self.namespace, body["metadata"]["name"]
        extra = {"run_id": run.run_id, "attempt": run.attempt}
        retries = self.cfg["launch_retries"]
        for attempt_no in range(retries + 1):
            try:
                await self._call("create_namespaced_job", ns, body)
                log.info("run %s attempt %s: created Job %s/%s", run.run_id, run.attempt, ns, name, extra=extra)
                return
            except ApiException as exc:
                if exc.status == 409:
                    await self._check_existing(ns, name, run, exc)
                    return
                error = LaunchError(
                    f"Kubernetes refused Job {ns}/{name} (HTTP {exc.status}): {_api_message(exc)}",
                    transient=_transient(exc.status),
                )
            except TRANSPORT_ERRORS as exc:
                error = LaunchError(f"Kubernetes API unreachable creating Job {ns}/{name}: {exc!r}", transient=True)
            if not error.transient or attempt_no == retries:
                log.error("run %s attempt %s: %s", run.run_id, run.attempt, error, extra=extra)
                raise error
            delay = self._backoff(attempt_no)
            log.warning("run %s attempt %s: %s; retrying in %.2fs", run.run_id, run.attempt, error, delay, extra=extra)
            await asyncio.sleep(delay)

    async def _check_existing(self, ns: str, name: str, run: WorkerRun, conflict: ApiException) -> None:
        """409: an earlier try of this attempt created the Job (the reply was lost); if so, fine."""
        said = f"Kubernetes refused Job {ns}/{name} (HTTP 409): {_api_message(conflict)}"
        try:
            job = await self._call("read_namespaced_job", name, ns)
        except (ApiException, *TRANSPORT_ERRORS) as exc:
            raise LaunchError(f"{said}; and the Job cannot be read: {_describe(exc)}", transient=True) from exc
        meta = job.get("metadata") or {}
        owner = (meta.get("annotations") or {}).get(ANNOTATION_RUN_ID)
        attempt = (meta.get("labels") or {}).get(LABEL_ATTEMPT)
        if owner != run.run_id or attempt != str(run.attempt):
            raise LaunchError(f"{said}; the Job belongs to run {owner} attempt {attempt}, not to this one")
        log.info(
            "run %s attempt %s: Job %s/%s already exists, treating it as launched",
            run.run_id,
            run.attempt,
            ns,
            name,
            extra={"run_id": run.run_id, "attempt": run.attempt},
        )

    def _backoff(self, failures: int) -> float:
        delay = min(MAX_BACKOFF_SECONDS, self.cfg["retry_backoff_seconds"] * 2**failures)
        return delay * random.uniform(0.8, 1.2)  # jitter: replicas must not retry in lockstep

    # --- terminate / health / debug ----------------------------------------------------------

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        ns, name = handle["namespace"], handle["job_name"]
        extra = {"run_id": handle.get("run_id"), "attempt": handle.get("attempt")}
        try:
            # Foreground: the Job stays (marked) until its pods are gone, so NOT_FOUND from
            # check_health afterwards really means the worker stopped.
            await self._call("delete_namespaced_job", name, ns, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise LaunchError(
                f"cannot delete Job {ns}/{name} (HTTP {exc.status}): {_api_message(exc)}",
                transient=_transient(exc.status),
            ) from exc
        except TRANSPORT_ERRORS as exc:
            raise LaunchError(f"cannot delete Job {ns}/{name}: {exc!r}", transient=True) from exc
        log.info(
            "run %s attempt %s: deleted Job %s/%s",
            handle.get("run_id"),
            handle.get("attempt"),
            ns,
            name,
            extra=extra,
        )
        if grace_seconds is not None:
            await self._delete_pods(ns, name, grace_seconds)
        return True

    async def _delete_pods(self, ns: str, name: str, grace_seconds: float) -> None:
        """The garbage collector deletes pods with their own grace; this one may be shorter."""
        grace = max(0, math.ceil(grace_seconds))
        with contextlib.suppress(ApiException, *TRANSPORT_ERRORS):
            pods = await self._call("list_namespaced_pod", ns, label_selector=f"job-name={name}")
            for pod in pods.get("items") or []:
                with contextlib.suppress(ApiException):
                    await self._call(
                        "delete_namespaced_pod",
                        pod["metadata"]["name"],
                        ns,
                        grace_period_seconds=grace,
                    )

    async def check_health(self, handle: Handle) -> Health:
        ns, name = handle["namespace"], handle["job_name"]
        try:
            job = await self._call("read_namespaced_job", name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return Health(HealthStatus.NOT_FOUND, message=f"Job {ns}/{name} not found")
            return Health(HealthStatus.UNKNOWN, message=f"Kubernetes API error: {_api_message(exc)}")
        except (LaunchError, *TRANSPORT_ERRORS) as exc:
            return Health(HealthStatus.UNKNOWN, message=f"Kubernetes API unreachable: {exc!r}")
        try:
            pod = await self._job_pod(ns, name)
        except (ApiException, *TRANSPORT_ERRORS) as exc:
            # The Job's own conditions still decide; only the details are missing.
            log.warning("cannot read the pod of Job %s/%s: %s", ns, name, exc)
            pod = None
        return health_from(job, pod)

    async def debug_info(self, handle: Handle) -> str:
        ns, name = handle["namespace"], handle["job_name"]
        lines = [f"Kubernetes Job {ns}/{name}"]
        try:
            job = await self._call("read_namespaced_job", name, ns)
            lines.append(f"job: {health_from(job, None).message}")
        except (ApiException, *TRANSPORT_ERRORS, LaunchError) as exc:
            lines.append(f"job: cannot read ({_describe(exc)})")
        try:
            pod = await self._job_pod(ns, name)
        except (ApiException, *TRANSPORT_ERRORS, LaunchError) as exc:
            lines.append(f"pod: cannot list ({_describe(exc)})")
            pod = None
        subject = name
        if pod is not None:
            subject = pod["metadata"]["name"]
            lines.append(f"pod {subject}: {(pod.get('status') or {}).get('phase')}")
            lines.append(f"--- last {self.cfg['log_tail_lines']} log lines ---")
            lines.append(await self._log_tail(ns, subject))
        lines.append(f"--- events of {subject} ---")
        lines.extend(await self._events(ns, subject))
        return "\n".join(lines)[-16_000:]

    async def _log_tail(self, ns: str, pod: str) -> str:
        try:
            text = await self._call(
                "read_namespaced_pod_log",
                pod,
                ns,
                container=CONTAINER_NAME,
                tail_lines=self.cfg["log_tail_lines"],
                raw=True,
            )
        except (ApiException, *TRANSPORT_ERRORS) as exc:
            return f"(no log: {_describe(exc)})"
        return text.rstrip("\n") or "(empty log)"

    async def _events(self, ns: str, name: str) -> list[str]:
        try:
            events = await self._call("list_namespaced_event", ns, field_selector=f"involvedObject.name={name}")
        except (ApiException, *TRANSPORT_ERRORS) as exc:
            return [f"(no events: {_describe(exc)})"]
        items = sorted(
            events.get("items") or [],
            key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "",
        )
        return [
            f"{e.get('lastTimestamp') or ''} {e.get('type')} {e.get('reason')}: {e.get('message')}" for e in items
        ] or ["(none)"]

    # --- watch -------------------------------------------------------------------------------

    def watch(self) -> AsyncIterator[WorkerExit]:
        """Exits of the Jobs this instance launched or adopted; one consumer at a time."""
        return self._watch_exits()

    async def _watch_exits(self) -> AsyncIterator[WorkerExit]:
        self._watching = True
        for ns in {self.namespace, *(ns for ns, _ in self._watched)}:
            self._ensure_ns_watch(ns)
        try:
            while True:
                yield await self._exits.get()
        finally:
            self._watching = False
            await self._stop_ns_watches()

    async def adopt(self, handles: list[Handle]) -> None:
        for handle in handles:
            if handle.get("launcher", self.name) == self.name:
                self._watch_add(handle)

    def _watch_add(self, handle: Handle) -> None:
        self._seq += 1
        key = (handle["namespace"], handle["job_name"])
        self._watched[key] = _Watched(handle["run_id"], int(handle["attempt"]), self._seq)
        self._ensure_ns_watch(handle["namespace"])

    def _ensure_ns_watch(self, ns: str) -> None:
        if self._watching and (ns not in self._ns_tasks or self._ns_tasks[ns].done()):
            self._ns_tasks[ns] = asyncio.get_running_loop().create_task(
                self._watch_namespace(ns), name=f"runherd-k8s-watch-{ns}"
            )

    async def _stop_ns_watches(self) -> None:
        tasks = list(self._ns_tasks.values())
        self._ns_tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_namespace(self, ns: str) -> None:
        """Relist, then watch from the list's resourceVersion; resume after a drop, relist
        after 410 Gone. Never returns: errors are logged and retried with backoff."""
        rv: str | None = None
        failures = 0
        while True:
            try:
                if rv is None:
                    rv = await self._relist(ns)
                started = asyncio.get_running_loop().time()
                new_rv = await self._stream(ns, rv)
                if new_rv == rv and asyncio.get_running_loop().time() - started < 1:
                    # Closed at once with nothing in it (a proxy?): back off rather than spin.
                    await asyncio.sleep(self._backoff(failures))
                    failures += 1
                else:
                    failures = 0
                rv = new_rv
            except _Gone as exc:
                log.info("watch of Jobs in %s: %s; relisting", ns, exc)
                rv = None
            except (ApiException, LaunchError, ValueError, *TRANSPORT_ERRORS) as exc:
                delay = self._backoff(failures)
                failures += 1
                log.warning(
                    "watch of Jobs in %s broke (%s); again in %.2fs from version %s",
                    ns,
                    _describe(exc),
                    delay,
                    rv,
                )
                await asyncio.sleep(delay)

    async def _relist(self, ns: str) -> str:
        """Report what finished or vanished while nobody watched; the version to watch from."""
        seq = self._seq
        jobs = await self._call("list_namespaced_job", ns, label_selector=LABEL_RUN_ID)
        present = set()
        for job in jobs.get("items") or []:
            present.add(job["metadata"]["name"])
            if _finished_condition(job) is not None:
                await self._report((ns, job["metadata"]["name"]), job)
        for (wns, name), watched in list(self._watched.items()):
            if wns == ns and name not in present and watched.seq <= seq:
                await self._report((ns, name), None)
        return str(jobs["metadata"]["resourceVersion"])

    async def _stream(self, ns: str, rv: str) -> str:
        """One watch request; returns the last resourceVersion seen when it ends."""
        api = await self._api()
        timeout = self.cfg["watch_timeout_seconds"]
        resp: Any = await client.BatchV1Api(api).list_namespaced_job(  # raw aiohttp response
            ns,
            label_selector=LABEL_RUN_ID,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=self.cfg["request_timeout_seconds"], sock_read=timeout + 30
            ),
        )
        try:
            if resp.status == 410:
                raise _Gone(f"HTTP 410 for version {rv}")
            if resp.status != 200:
                exc = ApiException(status=resp.status, reason=resp.reason)
                exc.body = await resp.text()
                raise exc
            while line := await resp.content.readline():
                rv = await self._on_event(ns, json.loads(line)) or rv
        finally:
            resp.release()
        return rv

    async def _on_event(self, ns: str, event: Mapping[str, Any]) -> str | None:
        etype, obj = event.get("type"), event.get("object")
        if not isinstance(etype, str) or not isinstance(obj, dict):
            # Not a watch stream (a proxy's answer?): back off rather than spin.
            raise ValueError(f"malformed watch event: {str(event)[:200]}")
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(obj.get("message") or "resource version too old")
            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
        meta = obj.get("metadata") or {}
        key = (ns, meta.get("name", ""))
        if etype != "BOOKMARK" and key in self._watched:
            if _finished_condition(obj) is not None:
                await self._report(key, obj)
            elif etype == "DELETED":
                await self._report(key, None)
        return meta.get("resourceVersion")

    async def _report(self, key: tuple[str, str], job: Mapping[str, Any] | None) -> None:
        watched = self._watched.pop(key, None)
        if watched is None:
            return
        ns, name = key
        if job is None:
            health = Health(
                HealthStatus.NOT_FOUND,
                reason="Deleted",
                message=f"Job {ns}/{name} was deleted before it finished",
            )
        else:
            try:
                pod = await self._job_pod(ns, name)
            except (ApiException, *TRANSPORT_ERRORS):
                pod = None  # the Job's condition still says how it ended
            health = health_from(job, pod)
        log.info(
            "run %s attempt %s: Job %s/%s exited: %s",
            watched.run_id,
            watched.attempt,
            ns,
            name,
            health.message,
            extra={"run_id": watched.run_id, "attempt": watched.attempt},
        )
        self._exits.put_nowait(
            WorkerExit(
                run_id=watched.run_id,
                attempt=watched.attempt,
                exit_code=health.exit_code,
                signal=_signal(health.exit_code),
                reason=health.reason,
                message=health.message,
            )
        )

    async def close(self) -> None:
        await self._stop_ns_watches()
        if self._client is not None:
            await self._client.close()
            self._client = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status}: {_api_message(exc)}"
    return repr(exc) if not str(exc) else str(exc)
