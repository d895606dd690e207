"""KubernetesLauncher: launch, terminate, check_health, debug_info, adopt and close; the API plumbing,
the mapping of API errors and the retries of a create."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from runherd.errors import LaunchError
from runherd.execution import ExecutorName
from runherd.launchers.base import Handle, Health, HealthStatus, RunLauncher, WorkerExit, WorkerRun
from runherd.launchers.kubernetes.api_errors import TRANSPORT_ERRORS, _api_message, _describe, _transient
from runherd.launchers.kubernetes.config import validate_config
from runherd.launchers.kubernetes.health import _latest, health_from
from runherd.launchers.kubernetes.job import (
    ANNOTATION_RUN_ID,
    CONTAINER_NAME,
    LABEL_ATTEMPT,
    MAX_SECRET_BYTES,
    build_job,
    job_name,
    plan_secret,
)
from runherd.launchers.kubernetes.steps import reap as reap_steps
from runherd.launchers.kubernetes.watch import JobWatch, _Watched
from runherd.plan import compress

# The package's logger, as before the split: records keep the name runherd.launchers.kubernetes.
log = logging.getLogger("runherd.launchers.kubernetes")

MAX_BACKOFF_SECONDS = 30.0

# --- the launcher ----------------------------------------------------------------------------------


class KubernetesLauncher(JobWatch, RunLauncher):
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
        self._orphan_tasks: set[asyncio.Task[None]] = set()

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
        plan_gz = compress(run.plan) if run.plan else b""
        if len(plan_gz) > MAX_SECRET_BYTES:
            raise LaunchError(
                f"the plan of run {run.run_id} attempt {run.attempt} is {len(plan_gz)} bytes compressed; "
                f"a Kubernetes Secret holds at most {MAX_SECRET_BYTES}"
            )
        body = build_job(self.cfg, run, name)
        if run.executor == ExecutorName.LAUNCHER and self.cfg["step_jobs_service_account_name"]:
            # The worker creates its steps' Jobs itself: it alone gets that API access.
            body["spec"]["template"]["spec"]["serviceAccountName"] = self.cfg["step_jobs_service_account_name"]
        job = await self._create(body, run)
        if run.plan:
            # After the Job, so the Secret can name it as its owner; the pod waits for its volume.
            await self._create_secret(plan_secret(job, plan_gz), run)
        handle: Handle = {
            "launcher": self.name,
            "namespace": self.namespace,
            "job_name": name,
            "run_id": run.run_id,
            "attempt": run.attempt,
        }
        if run.executor == ExecutorName.LAUNCHER:
            handle["step_jobs"] = True  # its terminate looks for step Jobs: only this worker has them
        self._watch_add(handle)
        return handle

    async def _create(self, body: dict[str, Any], run: WorkerRun) -> dict[str, Any]:
        ns, name = self.namespace, body["metadata"]["name"]
        extra = {"run_id": run.run_id, "attempt": run.attempt}
        retries = self.cfg["launch_retries"]
        for attempt_no in range(retries + 1):
            try:
                created: dict[str, Any] = await self._call("create_namespaced_job", ns, body)
                log.info("run %s attempt %s: created Job %s/%s", run.run_id, run.attempt, ns, name, extra=extra)
                return created
            except ApiException as exc:
                if exc.status == 409:
                    return await self._check_existing(ns, name, run, exc)
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
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _create_secret(self, body: dict[str, Any], run: WorkerRun) -> None:
        """The plan's Secret; 409 is an earlier try's (the Job's pod reads whichever is there)."""
        ns, name = self.namespace, body["metadata"]["name"]
        retries = self.cfg["launch_retries"]
        for attempt_no in range(retries + 1):
            try:
                await self._call("create_namespaced_secret", ns, body)
                return
            except ApiException as exc:
                if exc.status == 409:
                    return
                error = LaunchError(
                    f"Kubernetes refused the plan Secret {ns}/{name} (HTTP {exc.status}): {_api_message(exc)}",
                    transient=_transient(exc.status),
                )
            except TRANSPORT_ERRORS as exc:
                error = LaunchError(f"Kubernetes API unreachable creating Secret {ns}/{name}: {exc!r}", transient=True)
            if not error.transient or attempt_no == retries:
                log.error("run %s attempt %s: %s", run.run_id, run.attempt, error)
                raise error
            await asyncio.sleep(self._backoff(attempt_no))

    async def _check_existing(self, ns: str, name: str, run: WorkerRun, conflict: ApiException) -> dict[str, Any]:
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
        return job

    def _backoff(self, failures: int) -> float:
        delay = min(MAX_BACKOFF_SECONDS, self.cfg["retry_backoff_seconds"] * 2**failures)
        return delay * random.uniform(0.8, 1.2)  # jitter: replicas must not retry in lockstep

    # --- terminate / health / debug ----------------------------------------------------------

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        try:
            return await self._terminate_job(handle, grace_seconds)
        finally:
            # A worker's `launcher`-executor steps stop with it (unless a newer attempt adopted them).
            if handle.get("step_jobs") and handle.get("run_id"):
                deleted = await reap_steps(self, str(handle["run_id"]), handle.get("attempt"))
                if deleted:
                    log.info("run %s: deleted %d step Jobs", handle["run_id"], len(deleted))

    async def _terminate_job(self, handle: Handle, grace_seconds: float | None) -> bool:
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

    async def adopt(self, handles: list[Handle]) -> None:
        for handle in handles:
            if handle.get("launcher", self.name) == self.name:
                self._watch_add(handle)

    async def close(self) -> None:
        for task in list(self._orphan_tasks):
            task.cancel()
        await self._stop_ns_watches()
        if self._client is not None:
            await self._client.close()
            self._client = None
