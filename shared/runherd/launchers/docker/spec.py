"""The container create spec of one run attempt: its name, labels, limits and options."""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Mapping
from typing import Any

from runherd.launchers.base import WorkerRun
from runherd.launchers.docker.config import DockerConfig

LABEL_RUN_ID = "runherd.run_id"
LABEL_ATTEMPT = "runherd.attempt"
LABEL_JOB = "runherd.job"

# The plan is copied into the container before it starts (never in its env: 128 KiB per variable).
# Under / because every image has it; readable by any user the image may run as.
PLAN_DIR = ".runherd"
PLAN_PATH = f"/{PLAN_DIR}/plan.json"

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


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
    if run.plan:
        env.pop("RUNHERD_PLAN", None)
        env["RUNHERD_PLAN_FILE"] = PLAN_PATH
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


def plan_archive(plan: str) -> bytes:
    """A tar of the plan file, for PUT /containers/{id}/archive?path=/ before the start."""
    data = plan.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(PLAN_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        info = tarfile.TarInfo(f"{PLAN_DIR}/plan.json")
        info.size, info.mode = len(data), 0o444
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
