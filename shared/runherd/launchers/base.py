"""The run launcher interface of DESIGN.md: how runherd starts, stops and watches workers.

A launcher is a class built from the ``run_launcher.config`` mapping. It must be safe to use from
several processes at once (the launcher service launches and watches; the monitor terminates and
checks health), so everything it needs to find a worker again is in the JSON ``handle`` that
``launch`` returns: runherd stores it in PostgreSQL and passes it back later, possibly to another
process or after a restart.
"""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

TERMINATE_CONCURRENCY = 32  # terminate_many's default: backend calls in flight at once

Handle = dict[str, Any]
"""JSON-serialisable description of one worker (pid, container id, Job name...)."""


class HealthStatus(enum.StrEnum):
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"  # the backend could not say (API error): never treated as a crash
    NOT_FOUND = "NOT_FOUND"  # the worker is confirmed gone and its exit status is lost


@dataclass(frozen=True)
class Health:
    status: HealthStatus
    exit_code: int | None = None
    reason: str | None = None  # short machine-ish cause: "OOMKilled", "SIGKILL", "ImagePullBackOff"
    message: str | None = None  # a sentence for the event log

    @property
    def exited(self) -> bool:
        """True when the worker is confirmed to be no longer running."""
        return self.status in (HealthStatus.SUCCESS, HealthStatus.FAILED, HealthStatus.NOT_FOUND)


@dataclass(frozen=True)
class WorkerRun:
    """What a launcher needs to start one attempt of a run."""

    run_id: str
    attempt: int
    job: str
    env: Mapping[str, str]  # the user's env alone (credentials ride in the plan, never in the env)
    tags: Mapping[str, Any] = field(default_factory=dict)
    command: list[str] | None = None  # None: the launcher's configured worker command
    max_runtime_seconds: int | None = None
    # The plan (JSON), of any size: the launcher hands it over as a file named by
    # RUNHERD_PLAN_FILE, never in the environment (Linux caps one variable at 128 KiB).
    plan: str = ""
    worker_id: str = ""  # this worker instance, also in the plan
    # The run's executor (runherd.execution): under ``launcher`` a container launcher gives the
    # worker what it needs to start its steps' containers (Docker: the engine's socket).
    executor: str = ""

    def inline_plan_env(self) -> dict[str, str]:
        """``env`` plus the plan inline (RUNHERD_PLAN), for a launcher of one's own that cannot
        ship a file: it then works for plans under Linux's 128 KiB only."""
        return {**self.env, "RUNHERD_PLAN": self.plan} if self.plan else dict(self.env)


@dataclass(frozen=True)
class WorkerExit:
    """A worker exit seen by ``watch()``."""

    run_id: str
    attempt: int
    exit_code: int | None
    signal: int | None = None
    reason: str | None = None
    message: str | None = None


class RunLauncher(ABC):
    """Base class of every run launcher; subclasses set ``name`` and implement the methods."""

    name: str = ""
    # Launch calls in flight at once in the launcher service (each a backend call: an HTTP request
    # to Docker or Kubernetes); a launcher whose launch is a local fork can take more.
    launch_concurrency: int = 16
    # Its workers live in this very process (the sim fleet): the process is a load generator, so
    # it leaves the status relay, which the monitors also run, to them.
    hosts_workers_in_process: bool = False

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: Mapping[str, Any] = dict(config or {})

    @abstractmethod
    async def launch(self, run: WorkerRun) -> Handle:
        """Start the worker and return at once with its handle. Raises LaunchError."""

    @abstractmethod
    async def terminate(self, handle: Handle, *, grace_seconds: float | None = None) -> bool:
        """Stop the worker: polite signal, then force after ``grace_seconds`` (None: the
        launcher's configured grace; 0: force at once). True if a worker was found to stop."""

    async def terminate_many(
        self, handles: list[Handle], *, grace_seconds: float | None = None
    ) -> list[bool | BaseException]:
        """``terminate`` for many workers at once (a mass timeout): one result per handle, an
        exception where that terminate raised. This default runs ``terminate`` with bounded
        concurrency; a launcher that can signal many workers cheaply overrides it."""
        slots = asyncio.Semaphore(TERMINATE_CONCURRENCY)

        async def one(handle: Handle) -> bool:
            async with slots:
                return await self.terminate(handle, grace_seconds=grace_seconds)

        return list(await asyncio.gather(*(one(h) for h in handles), return_exceptions=True))

    def can_reach(self, handle: Handle) -> bool:
        """Whether this instance can terminate the worker itself. False for a worker on another
        host that only that host's launcher service can stop: runherd then sends it a kill request."""
        return True

    @abstractmethod
    async def check_health(self, handle: Handle) -> Health:
        """Ask the backend how the worker is. API failures give UNKNOWN, never FAILED."""

    @abstractmethod
    async def debug_info(self, handle: Handle) -> str:
        """A few lines a person can read when the worker failed (its log's tail...)."""

    def watch(self) -> AsyncIterator[WorkerExit] | None:
        """Optional: an endless async iterator of worker exits, so a crash is seen at once.

        It reports exits of workers launched by this instance and of those passed to
        ``adopt``. An exit may be reported more than once (after a reconnect): runherd dedupes.
        Launchers without it return None and rely on check_health and heartbeats.
        """
        return None

    async def adopt(self, handles: list[Handle]) -> None:  # noqa: B027 - optional hook
        """Start watching workers launched by an earlier instance (after a launcher restart)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once at shutdown."""
