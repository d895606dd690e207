"""Helpers for tests against a real Docker engine (no mocks).

Workers run in ``runherd-base:latest`` (built by scripts/ci/dockerd.sh from this machine's own
libraries) with the Python interpreter, the venv and the checkout bind-mounted at their host
paths, so ``<venv>/bin/python -m <module>`` works inside the container exactly as outside. Every
path comes from the running interpreter and this file's location, so a fresh clone anywhere works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiodocker

from runherd.launchers.base import WorkerExit, WorkerRun
from runherd.launchers.docker import DEFAULT_DOCKER_URL, DockerLauncher

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERD_SCRIPT = REPO_ROOT / "scripts" / "ci" / "dockerd.sh"
BASE_IMAGE = os.environ.get("RUNHERD_BASE_IMAGE", "runherd-base:latest")
# Labels every container of this test session, so teardown removes exactly ours.
TEST_LABEL = "runherd-test.session"
SESSION = uuid.uuid4().hex[:12]
PYTHON = sys.executable


def docker_url() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


def docker_unavailable_reason() -> str | None:
    """None when an engine answers GET /_ping, else why not (the reason tests skip with)."""
    url = urlparse(docker_url())
    try:
        if url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(3)
            sock.connect(url.path)
        elif url.scheme in ("tcp", "http"):
            sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 2375), 3)
        else:
            return f"cannot probe DOCKER_HOST scheme {url.scheme!r}"
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = sock.recv(4096)
    except OSError as exc:
        return f"no Docker engine at {docker_url()} ({exc}); run scripts/ci/dockerd.sh"
    if b" 200 " not in answer.split(b"\r\n", 1)[0]:
        return f"Docker engine at {docker_url()} answered {answer[:60]!r}"
    return None


def docker_available() -> bool:
    return docker_unavailable_reason() is None


def ensure_base_image() -> None:
    """Build the base image if it is missing (the script is a no-op when it is there)."""
    result = subprocess.run(["bash", str(DOCKERD_SCRIPT)], capture_output=True, text=True, timeout=180, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{DOCKERD_SCRIPT} failed: {result.stderr.strip()}")


def worker_binds() -> list[str]:
    """Read-only binds of the interpreter, the venv and the checkout, at the same paths."""
    paths = dict.fromkeys([sys.base_prefix, sys.prefix, str(REPO_ROOT)])
    return [f"{p}:{p}:ro" for p in paths]


def launcher_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "image": BASE_IMAGE,
        "network": "host",
        "volumes": worker_binds(),
        "env": {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
        "labels": {TEST_LABEL: SESSION},
        "container_options": {"WorkingDir": str(REPO_ROOT)},
        "stop_grace_seconds": 2,
        "launch_retries": 1,
    }
    config.update(overrides)
    return config


async def make_launcher(**overrides: Any) -> DockerLauncher:
    """A DockerLauncher configured for the test image and binds; the caller closes it."""
    launcher = DockerLauncher(launcher_config(**overrides))
    # Fail fast in tests rather than waiting out production backoffs.
    launcher.retry_base_delay = 0.2
    launcher.watch_base_delay = 0.2
    return launcher


def python_command(code: str) -> list[str]:
    return [PYTHON, "-c", code]


def new_run(
    command: list[str] | None = None, *, attempt: int = 1, env: dict[str, str] | None = None, job: str = "docker-test"
) -> WorkerRun:
    return WorkerRun(run_id=str(uuid.uuid4()), attempt=attempt, job=job, env=env or {}, command=command)


async def wait_until(
    predicate: Callable[[], Awaitable[bool] | bool], *, within: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` when ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


class ExitCollector:
    """Consumes ``launcher.watch()`` in the background and lets tests await one run's exit."""

    def __init__(self, launcher: DockerLauncher) -> None:
        self.launcher = launcher
        self.exits: dict[str, list[WorkerExit]] = defaultdict(list)
        self.seen_at: dict[str, float] = {}
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for worker_exit in self.launcher.watch():
            async with self._changed:
                self.exits[worker_exit.run_id].append(worker_exit)
                self.seen_at.setdefault(worker_exit.run_id, time.monotonic())
                self._changed.notify_all()

    async def wait_for(self, run_id: str, within: float = 10.0) -> WorkerExit:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: bool(self.exits.get(run_id)))
        return self.exits[run_id][0]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def remove_session_containers(docker: aiodocker.Docker) -> int:
    """Remove every container this test session created (found by its session label)."""
    filters = json.dumps({"label": [f"{TEST_LABEL}={SESSION}"]})
    containers = await docker.containers.list(all=True, filters=filters)
    for container in containers:
        await container.delete(force=True)
    return len(containers)
