"""The ``launcher`` executor on Docker: each try of a step in a container of its own.

The run's worker (in its own container, with the engine's socket mounted: ``worker_socket_bind``)
creates one container per step try, from the same launcher config as its own (image, binds,
network, limits, options), named ``runherd-<run_id>-step-<step>-<try>`` and labelled with the run
id, the attempt that started it, the step key and the try. The container runs
``python -m runherd.worker.detached /.runherd/step.json /.runherd/result.json``: the step and its
inputs are copied in before it starts, its result is copied out after it exits (the engine's
archive API, so no host path is shared between worker and step). Its log is the step's output.

The name is the step try's identity: a resumed attempt finds a still running container by it and
waits for it (never starting the try again: the engine refuses a second container of that name),
takes the result of one that finished, and starts afresh only when one that ended left no result.

``reap`` is what the launcher's terminate does after stopping a worker: it kills the step
containers of the run unless a newer attempt's worker is alive (that one has adopted them).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import tarfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import orjson
from aiodocker import Docker
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from runherd.launchers.base import WorkerRun
from runherd.launchers.docker.config import DockerConfig
from runherd.launchers.docker.errors import _TRANSPORT_ERRORS, _is_not_found
from runherd.launchers.docker.spec import LABEL_ATTEMPT, LABEL_RUN_ID, PLAN_DIR, build_container_spec

LABEL_STEP = "runherd.step"
LABEL_STEP_TRY = "runherd.step_try"
STEP_SPEC_PATH = f"/{PLAN_DIR}/step.json"
STEP_RESULT_PATH = f"/{PLAN_DIR}/result.json"
# How the worker reaches the engine: set by the launcher in the worker's container only (never a
# step's: runherd.worker.main keeps it out of the steps' environment).
DOCKER_URL_ENV = "RUNHERD_DOCKER_URL"
MAX_RESULT_BYTES = 8 * 1024 * 1024  # an output is at most 1 MiB of JSON; the tar around it is small

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def step_container_name(run_id: str, file_name: str, try_: int) -> str:
    """``file_name`` is runherd.step_groups.name(step key): any key, safely and uniquely."""
    return f"runherd-{_NAME_UNSAFE.sub('-', run_id)}-step-{file_name}-{try_}"


def worker_socket_bind(docker_url: str) -> tuple[list[str], dict[str, str]]:
    """What a ``launcher``-executor worker's container gets to create its steps' containers: the
    engine's unix socket at the same path (binds), and its URL (env). A tcp engine: the URL only."""
    url = urlparse(docker_url)
    if url.scheme == "unix":
        return [f"{url.path}:{url.path}"], {DOCKER_URL_ENV: docker_url}
    return [], {DOCKER_URL_ENV: docker_url}


def build_step_spec(
    cfg: DockerConfig,
    *,
    run_id: str,
    attempt: int,
    job: str,
    step_key: str,
    try_: int,
    env: Mapping[str, str],
    python: str,
) -> dict[str, Any]:
    """The create body of one step try's container: the worker's own config, its command the
    detached step, its environment the step's (built by the worker, not the worker's own)."""
    command = [python, "-m", "runherd.worker.detached", STEP_SPEC_PATH, STEP_RESULT_PATH]
    run = WorkerRun(run_id=run_id, attempt=attempt, job=job, env=dict(env), command=command)
    spec = build_container_spec(cfg, run)
    spec["Env"] = [f"{k}={v}" for k, v in env.items()]  # the step's alone: no config env re-added
    spec["Labels"] = {**spec["Labels"], LABEL_STEP: step_key, LABEL_STEP_TRY: str(try_)}
    return spec


def step_archive(spec: Mapping[str, Any]) -> bytes:
    """A tar of the step's spec, for PUT /containers/{id}/archive?path=/ before the start. The
    folder is writable by any user the image runs as: the result is written beside the spec."""
    data = orjson.dumps(spec)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(PLAN_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(folder)
        info = tarfile.TarInfo(STEP_SPEC_PATH.lstrip("/"))
        info.size, info.mode = len(data), 0o444
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def read_result(container: DockerContainer) -> dict[str, Any] | None:
    """The result the step's container left (it may have exited), or None: none written."""
    try:
        tar = await container.get_archive(STEP_RESULT_PATH)
    except DockerError as exc:
        if exc.status == 404:
            return None
        raise
    with tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.size <= MAX_RESULT_BYTES), None)
        f = tar.extractfile(member) if member is not None else None
        if f is None:
            return None
        try:
            got = json.loads(f.read())
        except ValueError:
            return None
    return got if isinstance(got, dict) else None


async def reap(docker: Docker, run_id: str, attempt: int | None) -> list[str]:
    """Kill the run's running step containers, unless a worker of an attempt newer than
    ``attempt`` is alive: it has adopted them, or will. The ids of those killed."""
    filters = json.dumps({"label": [f"{LABEL_RUN_ID}={run_id}"]})
    try:
        containers = await docker.containers.list(all=False, filters=filters)
    except (DockerError, *_TRANSPORT_ERRORS):
        return []
    steps, newer = [], False
    for c in containers:
        labels = c._container.get("Labels") or {}
        if LABEL_STEP in labels:
            steps.append(c)
        elif attempt is not None and _int(labels.get(LABEL_ATTEMPT)) > attempt:
            newer = True
    if newer or not steps:
        return []

    async def kill(c: DockerContainer) -> str | None:
        try:
            await c.kill()
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            if not _is_not_found(exc) and not (isinstance(exc, DockerError) and exc.status == 409):
                return None
        return c.id

    return [cid for cid in await asyncio.gather(*(kill(c) for c in steps)) if cid]


def _int(value: Any) -> int:
    with contextlib.suppress(TypeError, ValueError):
        return int(value)
    return 0
