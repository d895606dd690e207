"""The Job watch of KubernetesLauncher: one watch per namespace, resumed from its resourceVersion
after a drop and relisted after 410 Gone; finished or vanished Jobs become WorkerExits."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from runherd.errors import LaunchError
from runherd.launchers.base import Handle, Health, HealthStatus, WorkerExit
from runherd.launchers.kubernetes.api_errors import TRANSPORT_ERRORS, _describe
from runherd.launchers.kubernetes.health import _finished_condition, health_from
from runherd.launchers.kubernetes.job import LABEL_RUN_ID

# The package's logger, as before the split: records keep the name runherd.launchers.kubernetes.
log = logging.getLogger("runherd.launchers.kubernetes")


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


class JobWatch:
    """The watch half of KubernetesLauncher, which sets up the state below in its __init__."""

    cfg: dict[str, Any]
    namespace: str
    _watched: dict[tuple[str, str], _Watched]
    _seq: int
    _exits: asyncio.Queue[WorkerExit]
    _watching: bool
    _ns_tasks: dict[str, asyncio.Task[None]]
    _orphan_tasks: set[asyncio.Task[None]]

    if TYPE_CHECKING:  # KubernetesLauncher's API plumbing (launcher.py)

        async def _api(self) -> client.ApiClient: ...

        async def _call(self, method: str, *args: Any, raw: bool = False, **kwargs: Any) -> Any: ...

        async def _job_pod(self, ns: str, name: str) -> dict[str, Any] | None: ...

        def _backoff(self, failures: int) -> float: ...

    def _reap_orphans_later(self, run_id: str, attempt: int) -> None:
        """A worker's Job failed: its `launcher`-executor step Jobs run on, for a resumed attempt to
        adopt. If none is active after the grace, the run will not come back for them."""
        from runherd.launchers.kubernetes.launcher import KubernetesLauncher
        from runherd.launchers.kubernetes.steps import reap

        async def later() -> None:
            await asyncio.sleep(self.cfg["step_orphan_grace_seconds"])
            assert isinstance(self, KubernetesLauncher)
            deleted = await reap(self, run_id, attempt)
            if deleted:
                log.warning("run %s: deleted %d orphaned step Jobs", run_id, len(deleted))

        task = asyncio.ensure_future(later())
        self._orphan_tasks.add(task)
        task.add_done_callback(self._orphan_tasks.discard)

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
        if health.status is not HealthStatus.SUCCESS:
            self._reap_orphans_later(watched.run_id, watched.attempt)
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
