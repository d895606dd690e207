"""The ``launcher`` executor's steps on Docker, seen from the worker: one container per step try
(runherd.launchers.docker.steps says how they are built, named and found again).

``adopt`` takes over what an earlier attempt left (a running container is waited for, a finished
one's result taken) before ``spawn`` creates anything; ``stop`` stops the container (cancel, the
worker's SIGTERM). The worker talks to the engine at ``RUNHERD_DOCKER_URL``, which the launcher
set in the worker's container with the engine's socket mounted (and in no step's).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiodocker import Docker
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from runherd import step_groups
from runherd.contract import Step
from runherd.launchers.docker.config import DEFAULT_DOCKER_URL, parse_config
from runherd.launchers.docker.errors import _TRANSPORT_ERRORS
from runherd.launchers.docker.state import exit_from_state
from runherd.launchers.docker.steps import (
    DOCKER_URL_ENV,
    build_step_spec,
    read_result,
    step_archive,
    step_container_name,
)
from runherd.plan import Plan
from runherd.worker.steps import StepResult

POLL_SECONDS = 0.25
# Variables of the worker's own container that would be wrong in the step's (its host name).
_NOT_PASSED = frozenset({"HOSTNAME"})

_clients: dict[str, Docker] = {}


def _docker() -> Docker:
    """One client per worker: every step container of the attempt goes through it."""
    url = os.environ.get(DOCKER_URL_ENV) or DEFAULT_DOCKER_URL
    if url not in _clients:
        _clients[url] = Docker(url=url, timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60))
    return _clients[url]


async def close() -> None:
    """The worker is done: release its engine connections."""
    for docker in list(_clients.values()):
        with contextlib.suppress(Exception):
            await docker.close()
    _clients.clear()


class ContainerStep:
    """One try of a step in its own container."""

    def __init__(self, plan: Plan, step: Step, try_: int, launcher_config: Mapping[str, Any]) -> None:
        self.plan, self.step, self.try_ = plan, step, try_
        self.cfg = parse_config(launcher_config)
        self.name = step_container_name(plan.run_id, step_groups.name(step.key), try_)
        self.container: DockerContainer | None = None
        self.result: StepResult | None = None

    def _handle(self, adopted: bool, **more: Any) -> dict[str, Any]:
        assert self.container is not None
        return {"container_id": self.container.id, "name": self.name, "adopted": adopted, **more}

    async def adopt(self) -> dict[str, Any] | None:
        """The container an earlier attempt started for this try: still running (waited for),
        finished with a result (taken), or finished without one (removed: the try starts anew)."""
        docker = _docker()
        try:
            container = await docker.containers.get(self.name)
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise
        state = container._container.get("State") or {}
        if exit_from_state(self.name, state) is None and state.get("Status") != "created":
            self.container = container
            return self._handle(True)
        got = await read_result(container) if state.get("Status") != "created" else None
        if got is None:  # ended (or never started) without a result: this try runs again
            with contextlib.suppress(DockerError):
                await container.delete(force=True)
            return None
        self.container = container
        self.result = StepResult(bool(got.get("ok")), got.get("output"), got.get("error"))
        await self._cleanup()
        return self._handle(True, finished=True)

    async def spawn(self, inputs: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        spec = build_step_spec(
            self.cfg,
            run_id=self.plan.run_id,
            attempt=self.plan.attempt,
            job=self.plan.job,
            step_key=self.step.key,
            try_=self.try_,
            env={k: v for k, v in env.items() if k not in _NOT_PASSED},
            python=sys.executable,
        )
        try:
            container = await _docker().containers.create(spec, name=self.name)
        except DockerError as exc:
            # The name is taken: another worker of the run created this very try meanwhile.
            if exc.status == 409 and (handle := await self.adopt()) is not None:
                return handle
            raise
        self.container = container
        await container.put_archive("/", step_archive({"step": self.step.to_json(), "inputs": inputs}))
        await container.start()
        return self._handle(False)

    async def wait(self) -> StepResult:
        if self.result is not None:
            return self.result
        assert self.container is not None
        state = await self._wait_exit()
        got = await read_result(self.container)
        if got is None:
            exit_ = exit_from_state(self.name, state)
            why = exit_.message if exit_ is not None else f"container {self.name} is gone"
            return StepResult(False, error=f"step container ended without a result: {why}")
        self.result = StepResult(bool(got.get("ok")), got.get("output"), got.get("error"))
        await self._cleanup()
        return self.result

    async def _wait_exit(self) -> dict[str, Any]:
        """Polled: a long step outlives any one HTTP request, and an adopted one is no child."""
        assert self.container is not None
        while True:
            try:
                state: dict[str, Any] = (await self.container.show())["State"]
            except DockerError as exc:
                if exc.status == 404:
                    return {}
                state = {}
            except _TRANSPORT_ERRORS:
                state = {}  # the engine is away for a moment: ask again
            if state and exit_from_state(self.name, state) is not None:
                return state
            await asyncio.sleep(POLL_SECONDS)

    async def _cleanup(self) -> None:
        if self.cfg.remove_after_exit and self.container is not None:
            with contextlib.suppress(DockerError, *_TRANSPORT_ERRORS):
                await self.container.delete(force=True)

    async def run(self, inputs: dict[str, Any], env: dict[str, str]) -> StepResult:
        if await self.adopt() is None:
            await self.spawn(inputs, env)
        return await self.wait()

    async def stop(self, grace: float = 3.0) -> None:
        if self.container is None:
            return
        with contextlib.suppress(DockerError, *_TRANSPORT_ERRORS):
            await self.container.stop(t=math.ceil(grace))
