"""DockerLauncher: launch, terminate, check_health, debug_info, adopt and close, on a Docker engine.

The event-stream watcher it inherits is in ``watch.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiodocker import Docker
from aiodocker.containers import DockerContainer
from aiodocker.events import DockerEvents
from aiodocker.exceptions import DockerError

from runherd.errors import LaunchError
from runherd.execution import ExecutorName
from runherd.launchers.base import (
    Handle,
    Health,
    HealthStatus,
    RunLauncher,
    WorkerExit,
    WorkerRun,
)
from runherd.launchers.docker.config import DEFAULT_DOCKER_URL, parse_config
from runherd.launchers.docker.errors import _TRANSPORT_ERRORS, launch_error
from runherd.launchers.docker.spec import (
    LABEL_ATTEMPT,
    LABEL_RUN_ID,
    build_container_spec,
    container_name,
    plan_archive,
)
from runherd.launchers.docker.state import health_from_inspect
from runherd.launchers.docker.steps import reap as reap_steps
from runherd.launchers.docker.steps import worker_socket_bind
from runherd.launchers.docker.watch import EventWatcher, _Watched

# The package's logger, as before the split into modules: one name for all of the launcher's logs.
log = logging.getLogger("runherd.launchers.docker")

LOG_TAIL_LINES = 50


class DockerLauncher(EventWatcher, RunLauncher):
    """Runs each run attempt in its own container on a Docker engine."""

    name = "docker"

    # Class attributes rather than config keys: tuning knobs, not part of the public contract.
    retry_base_delay = 0.5
    retry_max_delay = 8.0
    # The watcher's knobs (watch_base_delay, replay_margin, ...) are on EventWatcher.

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.cfg = parse_config(self.config)
        self._docker: Docker | None = None
        self._watched: dict[str, _Watched] = {}
        self._exits: asyncio.Queue[WorkerExit] = asyncio.Queue()
        self._stream_task: asyncio.Task[None] | None = None
        self._events: DockerEvents | None = None
        self._resume = asyncio.Event()  # cleared by pause_event_stream()
        self._resume.set()
        self._connected = asyncio.Event()  # set while an event stream is open
        self._last_event_at: float | None = None  # engine clock, seconds
        self._tails: OrderedDict[str, str] = OrderedDict()
        self._closed = False
        self._orphan_tasks: set[asyncio.Task[None]] = set()

    # -- client

    def _client(self) -> Docker:
        # Created on first use: aiohttp wants a running loop, the constructor may run without one.
        if self._closed:
            raise RuntimeError("DockerLauncher is closed")
        if self._docker is None:
            url = self._url()
            # No total timeout (stop waits out the grace period, events never end) but a bound
            # on connecting and on silence, so a wedged engine gives UNKNOWN instead of a hang.
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
            self._docker = Docker(url=url, timeout=timeout)
        return self._docker

    def _url(self) -> str:
        return self.cfg.docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL

    async def close(self) -> None:
        self._closed = True
        for task in list(self._orphan_tasks):
            task.cancel()
        if self._stream_task is not None:
            self._stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._stream_task
            self._stream_task = None
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    # -- launch

    async def launch(self, run: WorkerRun) -> Handle:
        name = container_name(run.run_id, run.attempt)
        spec = build_container_spec(self.cfg, run)
        if run.executor == ExecutorName.LAUNCHER:
            # The worker starts its steps' containers itself: it alone gets the engine's socket.
            binds, env = worker_socket_bind(self._url())
            spec["HostConfig"]["Binds"] = [*(spec["HostConfig"].get("Binds") or []), *binds]
            spec["Env"] = [*spec["Env"], *(f"{k}={v}" for k, v in env.items())]
        retries = self.cfg.launch_retries
        for try_no in range(retries + 1):
            try:
                handle = await self._launch_once(run, name, spec)
            except LaunchError as exc:
                if not exc.transient or try_no == retries:
                    log.error(
                        "docker launch failed run_id=%s attempt=%s name=%s: %s", run.run_id, run.attempt, name, exc
                    )
                    raise
                delay = min(self.retry_base_delay * 2**try_no, self.retry_max_delay)
                log.warning(
                    "docker launch try %d/%d failed run_id=%s attempt=%s, retrying in %.1fs: %s",
                    try_no + 1,
                    retries + 1,
                    run.run_id,
                    run.attempt,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
            else:
                log.info(
                    "docker launched run_id=%s attempt=%s container=%s name=%s",
                    run.run_id,
                    run.attempt,
                    handle["container_id"][:12],
                    name,
                )
                return handle
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _launch_once(self, run: WorkerRun, name: str, spec: dict[str, Any]) -> Handle:
        docker = self._client()
        try:
            container = await docker.containers.create(spec, name=name)
        except DockerError as exc:
            if exc.status != 409:
                raise launch_error(exc, f"cannot create container {name}") from exc
            return await self._claim_existing(run, name, exc)
        except _TRANSPORT_ERRORS as exc:
            raise launch_error(exc, f"cannot create container {name}") from exc
        # Watched before it starts, so even an instant death is reported.
        self._watch(container.id, run.run_id, run.attempt, name)
        try:
            await self._put_plan(container, run)
            await container.start()
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            await self._discard(container.id, name)
            raise launch_error(exc, f"cannot start container {name}") from exc
        return self._handle(container.id, name, run)

    async def _claim_existing(self, run: WorkerRun, name: str, conflict: DockerError) -> Handle:
        """A 409 on our name: an earlier try of this very attempt created it (its answer was lost,
        or a launcher died mid-launch). Take it over rather than running the attempt twice."""
        try:
            info = await self._client().containers.get(name)
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            # Gone in between (it was being removed): the next try can create it afresh.
            raise launch_error(conflict, f"cannot create container {name}") from exc
        labels = info["Config"].get("Labels") or {}
        if labels.get(LABEL_RUN_ID) != run.run_id or labels.get(LABEL_ATTEMPT) != str(run.attempt):
            raise LaunchError(
                f"cannot create container {name}: the name is taken by a container of another run: {conflict.message}",
                transient=True,
            )
        status = info["State"].get("Status")
        failed_start = status == "created" and bool(info["State"].get("Error"))
        if status in ("removing", "dead") or failed_start:
            # Unusable leftovers: clear them away and let the next try create the name afresh.
            if status != "removing":
                await self._discard(info.id, name)
            raise LaunchError(
                f"cannot create container {name}: an earlier try's container is "
                f"{'a failed start' if failed_start else status}: "
                f"{conflict.message}",
                transient=True,
            )
        log.warning(
            "docker reusing container of an earlier try run_id=%s attempt=%s name=%s status=%s",
            run.run_id,
            run.attempt,
            name,
            status,
        )
        self._watch(info.id, run.run_id, run.attempt, name)
        if status == "created":
            try:
                await self._put_plan(info, run)  # a launcher may have died before it put it
                await info.start()
            except (DockerError, *_TRANSPORT_ERRORS) as exc:
                await self._discard(info.id, name)
                raise launch_error(exc, f"cannot start container {name}") from exc
        elif status not in ("running", "paused", "restarting"):
            # It already ran and exited: no die event will come again, so report it now.
            await self._sweep_if_watching([info.id])
        return self._handle(info.id, name, run)

    @staticmethod
    async def _put_plan(container: DockerContainer, run: WorkerRun) -> None:
        """Copy the plan into the created container; it is started only after."""
        if run.plan:
            await container.put_archive("/", plan_archive(run.plan))

    async def _discard(self, container_id: str, name: str) -> None:
        """Remove a container that never ran properly, so the next try can reuse its name."""
        self._watched.pop(container_id, None)
        try:
            await self._client().containers.container(container_id).delete(force=True)
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            log.warning("docker could not remove failed container %s: %s", name, exc)

    @staticmethod
    def _handle(container_id: str, name: str, run: WorkerRun) -> Handle:
        return {
            "launcher": "docker",
            "container_id": container_id,
            "name": name,
            "run_id": run.run_id,
            "attempt": run.attempt,
            # its terminate looks for step containers: only a `launcher`-executor worker has them
            **({"step_containers": True} if run.executor == ExecutorName.LAUNCHER else {}),
        }

    # -- terminate, health, debug info

    @staticmethod
    def _ref(handle: Handle) -> str:
        ref = handle.get("container_id") or handle.get("name")
        if not ref:
            raise ValueError(f"not a docker handle: {handle!r}")
        return str(ref)

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        try:
            return await self._terminate_worker(handle, grace_seconds)
        finally:
            # Its `launcher`-executor steps stop with it (unless a newer attempt has adopted them).
            if handle.get("step_containers") and handle.get("run_id"):
                killed = await reap_steps(self._client(), str(handle["run_id"]), handle.get("attempt"))
                if killed:
                    log.info("docker killed %d step containers run_id=%s", len(killed), handle["run_id"])

    async def _terminate_worker(self, handle: Handle, grace_seconds: float | None) -> bool:
        grace = self.cfg.stop_grace_seconds if grace_seconds is None else max(grace_seconds, 0)
        container = self._client().containers.container(self._ref(handle))
        ids = f"run_id={handle.get('run_id')} attempt={handle.get('attempt')}"
        try:
            state = (await container.show())["State"]
            if not state.get("Running") and state.get("Status") not in ("created", "restarting", "paused"):
                log.info("docker terminate: container already exited %s", ids)
                return False
            if grace > 0:
                # The engine sends the stop signal, waits `t` seconds, then SIGKILLs by itself;
                # the HTTP call returns when the container is down.
                await container.stop(t=math.ceil(grace))
            await container.kill()
        except DockerError as exc:
            if exc.status == 404:
                log.info("docker terminate: no container %s", ids)
                return False
            if exc.status not in (304, 409):  # 304/409: already stopped, which is the aim
                log.warning("docker terminate failed %s: %s", ids, exc)
                raise
        await self._remove_if_never_started(container, ids)
        log.info("docker terminated %s container=%s grace=%.0fs", ids, self._ref(handle)[:12], grace)
        return True

    async def _remove_if_never_started(self, container: DockerContainer, ids: str) -> None:
        """A container that was created but never started cannot be stopped, and would look
        RUNNING (about to start) forever: remove it, so the worker is confirmed gone."""
        try:
            state = (await container.show())["State"]
            if state.get("Status") == "created":
                await container.delete(force=True)
                log.info("docker removed never-started container %s", ids)
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            log.warning("docker could not check terminated container %s: %s", ids, exc)

    async def check_health(self, handle: Handle) -> Health:
        ref = self._ref(handle)
        try:
            info = await self._client().containers.container(ref).show()
        except DockerError as exc:
            if exc.status == 404:
                return Health(HealthStatus.NOT_FOUND, message=f"container {handle.get('name') or ref} no longer exists")
            return Health(HealthStatus.UNKNOWN, message=f"docker engine error: {exc}")
        except _TRANSPORT_ERRORS as exc:
            return Health(HealthStatus.UNKNOWN, message=f"docker engine unreachable: {exc!r}")
        return health_from_inspect(info)

    async def debug_info(self, handle: Handle) -> str:
        ref = self._ref(handle)
        cached = self._tails.get(handle.get("container_id") or "")
        try:
            return await self._log_tail(ref)
        except DockerError as exc:
            if cached is not None:
                return cached
            if exc.status == 404:
                return f"container {handle.get('name') or ref} no longer exists: its log is lost"
            return f"could not read the log of container {ref}: {exc}"
        except _TRANSPORT_ERRORS as exc:
            return cached or f"could not read the log of container {ref}: {exc!r}"

    async def _log_tail(self, ref: str) -> str:
        chunks = await self._client().containers.container(ref).log(stdout=True, stderr=True, tail=LOG_TAIL_LINES)
        lines = "".join(chunks).splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(lines)

    # -- watch (the event-stream machinery is EventWatcher's, in watch.py)

    def watch(self) -> AsyncIterator[WorkerExit]:
        """Exits of launched and adopted containers; meant for one consumer (the launcher
        service): several iterators would share, not copy, the exits."""
        return self._watch_exits()

    async def adopt(self, handles: list[Handle]) -> None:
        ids = []
        for h in handles:
            cid = str(h.get("container_id") or "")
            if not cid:
                continue
            name = str(h.get("name") or cid[:12])
            self._watch(cid, str(h.get("run_id")), int(h.get("attempt") or 0), name)
            ids.append(cid)
        log.info("docker adopted %d containers", len(ids))
        # They may have exited while nobody watched: no event will tell, so look now.
        await self._sweep_if_watching(ids)
