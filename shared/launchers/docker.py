"""The Docker run launcher: one container per run attempt, watched through the engine's events.

Each attempt runs in a container named ``runherd-<run_id>-<attempt>`` and labelled
``runherd.run_id``, ``runherd.attempt`` and ``runherd.job``; the handle stores the container id,
so any process talking to the same engine can check, stop or read the worker later.

Exits are seen at once from the engine's event stream (``die`` events of runherd's containers).
The stream can drop (engine restart, socket trouble): the watcher then reconnects with backoff,
asks the engine to replay events since the last one it saw, and inspects every container it
watches, so an exit that happened while it was disconnected is still reported (maybe twice:
runherd dedupes).

Docker's own AutoRemove is never used: it deletes the container, its exit code and its log the
moment it exits. ``remove_after_exit`` instead removes the container once the watcher has
recorded its exit and captured its log tail (kept in memory for ``debug_info``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiodocker import Docker
from aiodocker.containers import DockerContainer
from aiodocker.events import DockerEvents
from aiodocker.exceptions import DockerError

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

LABEL_RUN_ID = "runherd.run_id"
LABEL_ATTEMPT = "runherd.attempt"
LABEL_JOB = "runherd.job"

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
LOG_TAIL_LINES = 50
# aiodocker reports "cannot connect" as a DockerError with this pseudo-status.
CONNECT_ERROR_STATUS = 900
# Engine 5xx answers that no retry can fix (a bad command or mount in the container spec).
_PERMANENT_5XX = (
    "executable file not found",
    "no such file or directory",
    "permission denied",
    "invalid mount",
    "invalid reference format",
)
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Transport failures that mean "the engine could not be asked", never "the worker failed".
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DockerConfig:
    image: str
    command: list[str] | None = None
    network: str = "host"  # the worker reaches RabbitMQ on 127.0.0.1
    env: Mapping[str, str] | None = None
    volumes: list[str] | None = None
    labels: Mapping[str, str] | None = None
    memory: int | None = None  # bytes
    cpus: float | None = None
    container_options: Mapping[str, Any] | None = None
    remove_after_exit: bool = False
    stop_grace_seconds: float = 10.0
    docker_url: str | None = None
    launch_retries: int = 3


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"run_launcher.config.{key}: {why}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_list(key: str, value: Any, *, empty_ok: bool = True) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not empty_ok):
        raise _fail(key, f"expected a {'' if empty_ok else 'non-empty '}list of strings, got {value!r}")
    return list(value)


def _str_map(key: str, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a mapping, got {type(value).__name__}")
    out: dict[str, str] = {}
    for k, v in value.items():
        # YAML turns `PORT: 5432` into an int: accept scalars, the engine wants strings anyway.
        if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
            raise _fail(key, f"expected string keys and scalar values, got {k!r}: {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def parse_memory(key: str, value: Any) -> int | None:
    """Docker's memory notation ("256m", "1g", 1048576) in bytes; units are powers of 1024."""
    if value is None:
        return None
    if _is_number(value) and value > 0:
        return int(value)
    match = _MEMORY.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise _fail(key, f"expected bytes or a size like '256m' or '1g', got {value!r}")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])


def _volumes(key: str, value: Any) -> list[str] | None:
    binds = _str_list(key, value)
    for bind in binds or []:
        parts = bind.split(":")
        if (
            len(parts) not in (2, 3)
            or not parts[0]
            or not parts[1].startswith("/")
            or (len(parts) == 3 and not parts[2])
        ):
            raise _fail(key, f"expected 'src:/dst[:ro]', got {bind!r}")
    return binds


def _remove_flag(cfg: Mapping[str, Any]) -> bool:
    values = {k: cfg[k] for k in ("auto_remove", "remove_after_exit") if k in cfg}
    for k, v in values.items():
        if not isinstance(v, bool):
            raise _fail(k, f"expected true or false, got {v!r}")
    if len(set(values.values())) > 1:
        raise _fail("remove_after_exit", "auto_remove and remove_after_exit disagree")
    return any(values.values())


def _number(cfg: Mapping[str, Any], key: str, default: float | None, *, minimum: float, integer: bool = False) -> Any:
    value = cfg.get(key, default)
    if value is None:
        return None
    if not _is_number(value) or value < minimum or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise _fail(key, f"expected {kind} >= {minimum}, got {value!r}")
    return value


_KNOWN_KEYS = frozenset(
    {
        "image",
        "command",
        "network",
        "env",
        "volumes",
        "labels",
        "memory",
        "cpus",
        "container_options",
        "auto_remove",
        "remove_after_exit",
        "stop_grace_seconds",
        "docker_url",
        "launch_retries",
    }
)


def parse_config(cfg: Mapping[str, Any]) -> DockerConfig:
    """Validate the ``run_launcher.config`` mapping; a ConfigError names the offending key."""
    unknown = sorted(set(cfg) - _KNOWN_KEYS)
    if unknown:
        raise _fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
    image = cfg.get("image")
    if not isinstance(image, str) or not image.strip():
        raise _fail("image", "required: the worker image, e.g. 'runherd-base:latest'")
    network = cfg.get("network", "host")
    if not isinstance(network, str) or not network:
        raise _fail("network", f"expected a network name, got {network!r}")
    labels = _str_map("labels", cfg.get("labels"))
    if labels and any(k.startswith("runherd.") for k in labels):
        raise _fail("labels", "the 'runherd.' prefix is reserved for runherd's own labels")
    options = cfg.get("container_options")
    if options is not None and not isinstance(options, Mapping):
        raise _fail("container_options", f"expected a mapping, got {type(options).__name__}")
    docker_url = cfg.get("docker_url")
    if docker_url is not None and (not isinstance(docker_url, str) or "://" not in docker_url):
        raise _fail("docker_url", f"expected a URL like unix:///var/run/docker.sock, got {docker_url!r}")
    cpus = _number(cfg, "cpus", None, minimum=0.01)
    return DockerConfig(
        image=image,
        command=_str_list("command", cfg.get("command"), empty_ok=False),
        network=network,
        env=_str_map("env", cfg.get("env")),
        volumes=_volumes("volumes", cfg.get("volumes")),
        labels=labels,
        memory=parse_memory("memory", cfg.get("memory")),
        cpus=float(cpus) if cpus is not None else None,
        container_options=dict(options) if options is not None else None,
        remove_after_exit=_remove_flag(cfg),
        stop_grace_seconds=float(_number(cfg, "stop_grace_seconds", 10.0, minimum=0)),
        docker_url=docker_url,
        launch_retries=_number(cfg, "launch_retries", 3, minimum=0, integer=True),
    )


# --------------------------------------------------------------------------------------------
# Pure helpers: container spec, state -> health, errors


def container_name(run_id: str, attempt: int) -> str:
    # Docker names allow [a-zA-Z0-9][a-zA-Z0-9_.-]*; run ids are uuids but need not be.
    return f"runherd-{_NAME_UNSAFE.sub('-', run_id)}-{attempt}"


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def build_container_spec(cfg: DockerConfig, run: WorkerRun) -> dict[str, Any]:
    """The body of POST /containers/create for one attempt of ``run``."""
    env = {**(cfg.env or {}), **run.env}
    host: dict[str, Any] = {"NetworkMode": cfg.network, "Binds": list(cfg.volumes or [])}
    if cfg.memory is not None:
        # Without MemorySwap the engine grants as much swap again: an OOM would become a crawl.
        host.update(Memory=cfg.memory, MemorySwap=cfg.memory)
    if cfg.cpus is not None:
        host["NanoCpus"] = int(cfg.cpus * 1e9)
    spec: dict[str, Any] = {
        "Image": cfg.image,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Labels": dict(cfg.labels or {}),
        "HostConfig": host,
    }
    command = run.command if run.command is not None else cfg.command
    if command is not None:
        spec["Cmd"] = list(command)
    if cfg.container_options:
        spec = _deep_merge(spec, cfg.container_options)
    # Last, so no option can break what watch() and adopt() find containers by.
    spec["Labels"] = {
        **(spec.get("Labels") or {}),
        LABEL_RUN_ID: run.run_id,
        LABEL_ATTEMPT: str(run.attempt),
        LABEL_JOB: run.job,
    }
    return spec


def _signal_reason(exit_code: int) -> tuple[int | None, str | None]:
    """Shells and the engine report death by signal N as exit code 128 + N."""
    if 128 < exit_code < 128 + 65:
        try:
            sig = signal.Signals(exit_code - 128)
        except ValueError:
            return exit_code - 128, None
        return int(sig), sig.name
    return None, None


@dataclass(frozen=True)
class _Exit:
    exit_code: int | None
    signal: int | None
    reason: str | None
    message: str


def exit_from_state(name: str, state: Mapping[str, Any]) -> _Exit | None:
    """The exit recorded in a container's ``State``, or None while it has not exited."""
    status = state.get("Status")
    error = state.get("Error") or ""
    if status == "created" and error:
        # Start failed (bad command, missing mount): the engine records why, the process never ran.
        code = state.get("ExitCode") or 127
        return _Exit(code, None, "StartError", f"container {name} could not start: {error}")
    if status not in ("exited", "dead"):
        return None
    code = int(state.get("ExitCode", 0) or 0)
    sig, reason = _signal_reason(code)
    if state.get("OOMKilled"):
        reason = "OOMKilled"
        message = f"container {name} was killed for exceeding its memory limit (exit {code})"
    elif code == 0:
        message = f"container {name} exited with code 0"
    else:
        reason = reason or "Error"
        message = f"container {name} exited with code {code}" + (f" ({reason})" if sig else "")
    if error:
        message += f": {error}"
    return _Exit(code, sig, reason, message)


def health_from_inspect(info: Mapping[str, Any]) -> Health:
    name = str(info.get("Name", "")).lstrip("/") or str(info.get("Id", ""))[:12]
    state = info.get("State") or {}
    exit_ = exit_from_state(name, state)
    if exit_ is None:
        status = state.get("Status", "unknown")
        return Health(HealthStatus.RUNNING, message=f"container {name} is {status}")
    if exit_.exit_code == 0 and exit_.reason is None:
        return Health(HealthStatus.SUCCESS, exit_code=0, message=exit_.message)
    return Health(HealthStatus.FAILED, exit_code=exit_.exit_code, reason=exit_.reason, message=exit_.message)


def launch_error(exc: BaseException, what: str) -> LaunchError:
    """Convert an engine or transport failure into LaunchError, keeping the engine's message."""
    if isinstance(exc, DockerError):
        status, message = exc.status, exc.message
        transient = status in (CONNECT_ERROR_STATUS, 409) or (
            status >= 500 and not any(m in message.lower() for m in _PERMANENT_5XX)
        )
        if status == CONNECT_ERROR_STATUS:  # not an HTTP answer: nothing answered at all
            return LaunchError(f"{what}: docker engine unreachable: {message}", transient=True)
        return LaunchError(f"{what}: docker engine answered {status}: {message}", transient=transient)
    return LaunchError(f"{what}: docker engine unreachable: {exc!r}", transient=True)


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, DockerError) and exc.status == 404


# --------------------------------------------------------------------------------------------
# The launcher


@dataclass(frozen=True)
class _Watched:
    run_id: str
    attempt: int
    name: str


class DockerLauncher(RunLauncher):
    """Runs each run attempt in its own container on a Docker engine."""

    name = "docker"

    # Class attributes rather than config keys: tuning knobs, not part of the public contract.
    retry_base_delay = 0.5
    retry_max_delay = 8.0
    watch_base_delay = 0.5
    watch_max_delay = 15.0
    # A stream that lived this long counts as healthy: the next loss restarts the backoff.
    watch_healthy_after = 10.0
    # How far back to replay events on reconnect, beyond the last one seen: clock slack.
    replay_margin = 2.0
    sweep_concurrency = 16
    tail_cache_size = 512

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

    # -- client

    def _client(self) -> Docker:
        # Created on first use: aiohttp wants a running loop, the constructor may run without one.
        if self._closed:
            raise RuntimeError("DockerLauncher is closed")
        if self._docker is None:
            url = self.cfg.docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
            # No total timeout (stop waits out the grace period, events never end) but a bound
            # on connecting and on silence, so a wedged engine gives UNKNOWN instead of a hang.
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
            self._docker = Docker(url=url, timeout=timeout)
        return self._docker

    async def close(self) -> None:
        self._closed = True
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
                await info.start()
            except (DockerError, *_TRANSPORT_ERRORS) as exc:
                await self._discard(info.id, name)
                raise launch_error(exc, f"cannot start container {name}") from exc
        elif status not in ("running", "paused", "restarting"):
            # It already ran and exited: no die event will come again, so report it now.
            await self._sweep_if_watching([info.id])
        return self._handle(info.id, name, run)

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
        }

    # -- terminate, health, debug info

    @staticmethod
    def _ref(handle: Handle) -> str:
        ref = handle.get("container_id") or handle.get("name")
        if not ref:
            raise ValueError(f"not a docker handle: {handle!r}")
        return str(ref)

    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
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

    # -- watch

    def watch(self) -> AsyncIterator[WorkerExit]:
        """Exits of launched and adopted containers; meant for one consumer (the launcher
        service): several iterators would share, not copy, the exits."""
        return self._watch_exits()

    async def _watch_exits(self) -> AsyncIterator[WorkerExit]:
        # One background task owns the stream; the iterator just drains what it found, so the
        # stream stays up (and exits are queued) while the consumer is busy.
        if self._stream_task is None or self._stream_task.done():
            self._stream_task = asyncio.create_task(self._stream_loop(), name="docker-watch")
        while True:
            yield await self._exits.get()

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

    def _watch(self, container_id: str, run_id: str, attempt: int, name: str) -> None:
        self._watched[container_id] = _Watched(run_id, attempt, name)

    @property
    def watched_count(self) -> int:
        return len(self._watched)

    @property
    def stream_connected(self) -> bool:
        """True while the event stream is open (for tests and diagnostics)."""
        return self._connected.is_set()

    async def pause_event_stream(self) -> None:
        """Drop the event stream and keep it down until ``resume_event_stream``.

        Operational and test hook: it simulates losing the engine connection, to prove that exits
        during the gap are still reported after reconnecting.
        """
        self._resume.clear()
        await self._stop_events()

    def resume_event_stream(self) -> None:
        self._resume.set()

    async def _stop_events(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            with contextlib.suppress(Exception):
                await events.stop()

    async def _stream_loop(self) -> None:
        delay = self.watch_base_delay
        while not self._closed:
            await self._resume.wait()
            started = time.monotonic()
            try:
                got_events, error = await self._stream_once()
            except Exception as exc:  # a bug must not end watching for good: log, reconnect
                log.exception("docker event stream handler failed")
                got_events, error = False, repr(exc)
            if self._closed:
                return
            if got_events or time.monotonic() - started > self.watch_healthy_after:
                delay = self.watch_base_delay
            log.warning(
                "docker event stream lost (%s); reconnecting in %.1fs, watching %d containers",
                error or "closed",
                delay,
                len(self._watched),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.watch_max_delay)

    def _since(self) -> float:
        # Replay from just before the last event seen, or from now on the first connection: the
        # sweep that follows the subscription covers anything older.
        last = self._last_event_at if self._last_event_at is not None else time.time()
        return last - self.replay_margin

    async def _stream_once(self) -> tuple[bool, str | None]:
        """One connection: subscribe, sweep, then handle die events until the stream ends."""
        # "destroy" too: a container removed without dying first (never started) is gone as well.
        filters = {"type": ["container"], "event": ["die", "destroy"], "label": [LABEL_RUN_ID]}
        events = DockerEvents(self._client())
        self._events = events
        sub = events.subscribe(filters=json.dumps(filters), since=f"{self._since():.6f}")
        task = events.task
        got_events = False
        try:
            # Sweep after subscribing: an exit after this point is in the stream (replayed from
            # `since` if the subscription is not live yet), one before it is found by inspect.
            await self._sweep(list(self._watched))
            if task is not None and not task.done():  # a refused connection ends it at once
                self._connected.set()
            while (event := await sub.get()) is not None:
                got_events = True
                try:
                    await self._on_event(event)
                except Exception:  # one odd event must not drop the stream
                    log.exception("docker event handling failed: %r", event)
        finally:
            self._connected.clear()
            if self._events is events:
                await self._stop_events()
        return got_events, self._task_error(task)

    @staticmethod
    def _task_error(task: asyncio.Future[Any] | None) -> str | None:
        if task is None or not task.done() or task.cancelled():
            return None
        exc = task.exception()
        return repr(exc) if exc is not None else None

    async def _on_event(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        cid = actor.get("ID") or event.get("id") or ""
        if "timeNano" in event:
            self._last_event_at = max(self._last_event_at or 0.0, event["timeNano"] / 1e9)
        if cid not in self._watched:
            return  # another launcher's container, or one already reported
        try:
            code = int((actor.get("Attributes") or {}).get("exitCode", ""))
        except ValueError:
            code = None
        await self._report(cid, event_exit_code=code)

    async def _sweep_if_watching(self, ids: list[str]) -> None:
        if self._stream_task is not None and not self._stream_task.done():
            await self._sweep(ids)

    async def _sweep(self, ids: list[str]) -> None:
        """Inspect containers and report those that exited (or vanished) while unobserved."""
        limit = asyncio.Semaphore(self.sweep_concurrency)

        async def one(cid: str) -> None:
            async with limit:
                await self._report(cid, only_if_exited=True)

        await asyncio.gather(*(one(cid) for cid in ids if cid in self._watched))

    async def _report(self, cid: str, *, event_exit_code: int | None = None, only_if_exited: bool = False) -> None:
        """Inspect one watched container and queue its WorkerExit if it has exited."""
        watched = self._watched.get(cid)
        if watched is None:
            return
        try:
            info = await self._client().containers.container(cid).show()
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            if not _is_not_found(exc) and only_if_exited:
                return  # cannot tell: a later sweep or check_health will
            info = None
        if info is not None:
            exit_ = exit_from_state(watched.name, info.get("State") or {})
            if exit_ is None:
                # Still running; after a die event that means a restart policy brought it back.
                return
        elif event_exit_code is not None:
            sig, reason = _signal_reason(event_exit_code)
            exit_ = _Exit(
                event_exit_code,
                sig,
                reason or (None if event_exit_code == 0 else "Error"),
                f"container {watched.name} exited with code {event_exit_code}",
            )
        else:
            exit_ = _Exit(None, None, "NotFound", f"container {watched.name} vanished: its exit status is lost")
        if self._watched.pop(cid, None) is None:
            return  # reported meanwhile by a concurrent sweep
        if self.cfg.remove_after_exit and info is not None:
            await self._capture_and_remove(cid, watched)
        log.info(
            "docker worker exited run_id=%s attempt=%s container=%s exit_code=%s reason=%s",
            watched.run_id,
            watched.attempt,
            cid[:12],
            exit_.exit_code,
            exit_.reason,
        )
        self._exits.put_nowait(
            WorkerExit(
                run_id=watched.run_id,
                attempt=watched.attempt,
                exit_code=exit_.exit_code,
                signal=exit_.signal,
                reason=exit_.reason,
                message=exit_.message,
            )
        )

    async def _capture_and_remove(self, cid: str, watched: _Watched) -> None:
        try:
            self._remember_tail(cid, await self._log_tail(cid))
            await self._client().containers.container(cid).delete(force=True)
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            log.warning(
                "docker could not remove exited container run_id=%s attempt=%s: %s",
                watched.run_id,
                watched.attempt,
                exc,
            )

    def _remember_tail(self, cid: str, tail: str) -> None:
        self._tails[cid] = tail
        while len(self._tails) > self.tail_cache_size:
            self._tails.popitem(last=False)
