"""Names, labels and the Job manifest of one run attempt."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from runherd.launchers.base import WorkerRun

CONTAINER_NAME = "runherd-worker"
LABEL_RUN_ID = "runherd/run_id"
LABEL_ATTEMPT = "runherd/attempt"
LABEL_JOB = "runherd/job"
ANNOTATION_RUN_ID = "runherd/run_id"  # the exact run id: label values are squashed
DEFAULT_COMMAND = ["runherd", "worker"]
# The plan reaches the worker as a file from a Secret named like the Job (never in its env: Linux
# caps one variable at 128 KiB). gzip-compressed, since the API caps a Secret at 1 MiB.
PLAN_VOLUME = "runherd-plan"
PLAN_MOUNT_PATH = "/var/run/runherd"
PLAN_KEY = "plan.json"
MAX_SECRET_BYTES = 1024 * 1024

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
    if run.plan:
        env.pop("RUNHERD_PLAN", None)
        env["RUNHERD_PLAN_FILE"] = f"{PLAN_MOUNT_PATH}/{PLAN_KEY}"
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": cfg["image"],
        "command": list(run.command if run.command is not None else cfg["command"] or DEFAULT_COMMAND),
        "env": [{"name": k, "value": str(v)} for k, v in env.items()],
    }
    if run.plan:
        container["volumeMounts"] = [{"name": PLAN_VOLUME, "mountPath": PLAN_MOUNT_PATH, "readOnly": True}]
    if cfg["env_from_secrets"]:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in cfg["env_from_secrets"]]
    if cfg["resources"]:
        container["resources"] = cfg["resources"]
    if cfg["image_pull_policy"]:
        container["imagePullPolicy"] = cfg["image_pull_policy"]
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if run.plan:
        pod_spec["volumes"] = [{"name": PLAN_VOLUME, "secret": {"secretName": name, "defaultMode": 0o444}}]
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


def plan_secret(job: Mapping[str, Any], plan_gz: bytes) -> dict[str, Any]:
    """The Secret holding the plan, owned by its Job: the garbage collector deletes it with the Job."""
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta.get("uid", "")}
            ],
        },
        "data": {PLAN_KEY: base64.b64encode(plan_gz).decode()},
    }
