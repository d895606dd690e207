"""A worker's Health from its Job and Pod status (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runherd.launchers.base import Health, HealthStatus
from runherd.launchers.kubernetes.job import CONTAINER_NAME

# Waiting reasons of a container that will not start by itself (restartPolicy Never).
CANT_START = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
# Terminated reasons worth passing on as they are; any other failure is "Error".
SPECIFIC_EXIT_REASONS = frozenset({"OOMKilled", "StartError", "ContainerCannotRun"})

# --- reading Job and Pod status (pure) -----------------------------------------------------------


def _finished_condition(job: Mapping[str, Any]) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def _container_state(pod: Mapping[str, Any] | None) -> dict[str, Any]:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER_NAME:
            return status.get("state") or {}
    return (statuses[0].get("state") or {}) if statuses else {}


def _unschedulable(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return cond
    return None


def _exit_health(name: str, succeeded: bool, cond: Mapping[str, Any] | None, terminated: Mapping[str, Any]) -> Health:
    exit_code = terminated.get("exitCode")
    if succeeded:
        return Health(
            HealthStatus.SUCCESS,
            exit_code=0 if exit_code is None else exit_code,
            reason="Completed",
            message=f"Job {name} completed",
        )
    term_reason = terminated.get("reason")
    if cond is not None and cond.get("reason") == "DeadlineExceeded":
        reason = "DeadlineExceeded"
    else:
        reason = term_reason if term_reason in SPECIFIC_EXIT_REASONS else "Error"
    parts = [f"Job {name} failed"]
    if cond is not None and cond.get("message"):
        parts.append(str(cond["message"]))
    if exit_code is not None:
        parts.append(f"container exited with code {exit_code} ({term_reason or 'Error'})")
    return Health(HealthStatus.FAILED, exit_code=exit_code, reason=reason, message=": ".join(parts))


def health_from(job: Mapping[str, Any], pod: Mapping[str, Any] | None) -> Health:
    """How the worker is, from its Job and (the latest of) its Pod."""
    name = job.get("metadata", {}).get("name", "?")
    state = _container_state(pod)
    terminated = state.get("terminated") or {}
    cond = _finished_condition(job)
    if cond is not None:
        return _exit_health(name, cond["type"] == "Complete", cond, terminated)
    if job.get("metadata", {}).get("deletionTimestamp"):
        return Health(HealthStatus.RUNNING, reason="Terminating", message=f"Job {name} is being deleted")
    if pod is None:
        return Health(HealthStatus.RUNNING, message=f"Job {name} has no pod yet")
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in CANT_START:
        message = f"worker of Job {name} cannot start: {waiting['reason']}"
        if waiting.get("message"):
            message += f": {waiting['message']}"
        return Health(HealthStatus.FAILED, reason=waiting["reason"], message=message)
    if terminated:  # the pod is done and the Job controller has not caught up yet
        return _exit_health(name, terminated.get("exitCode") == 0, None, terminated)
    if (cond := _unschedulable(pod)) is not None:
        return Health(
            HealthStatus.RUNNING,
            reason="Unschedulable",
            message=f"pod of Job {name} cannot be scheduled: {cond.get('message', '')}",
        )
    return Health(HealthStatus.RUNNING, message=f"Job {name} is active")


def _latest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod that matters: not being deleted first, then the newest."""
    if not pods:
        return None
    return max(
        pods,
        key=lambda p: (
            not p["metadata"].get("deletionTimestamp"),
            p["metadata"].get("creationTimestamp") or "",
        ),
    )
