"""The plan a worker receives from the launcher (never from the database) and which steps are ready."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from runherd.contract import Step, check_graph, parse_steps
from runherd.errors import InvalidMessage

PLAN_ENV = "RUNHERD_PLAN"


@dataclass(frozen=True)
class Plan:
    run_id: str
    attempt: int
    job: str
    steps: tuple[Step, ...]
    completed: dict[str, Any] = field(default_factory=dict)  # step key -> its recorded output
    heartbeat_interval_seconds: float = 5.0
    max_concurrent_steps: int = 4

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "v": 1,
                "run_id": self.run_id,
                "attempt": self.attempt,
                "job": self.job,
                "steps": [s.to_json() for s in self.steps],
                "completed": self.completed,
                "heartbeat_interval_seconds": self.heartbeat_interval_seconds,
                "max_concurrent_steps": self.max_concurrent_steps,
            }
        ).decode()


def from_json(text: str) -> Plan:
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"{PLAN_ENV} is not valid JSON: {exc}") from None
    steps = parse_steps(raw["steps"])
    check_graph(steps)
    return Plan(
        run_id=raw["run_id"],
        attempt=int(raw["attempt"]),
        job=raw["job"],
        steps=steps,
        completed=dict(raw.get("completed") or {}),
        heartbeat_interval_seconds=float(raw.get("heartbeat_interval_seconds", 5)),
        max_concurrent_steps=int(raw.get("max_concurrent_steps", 4)),
    )


def from_env() -> Plan:
    text = os.environ.get(PLAN_ENV)
    if not text:
        raise InvalidMessage(f"{PLAN_ENV} is not set: `runherd worker` is started by a run launcher")
    return from_json(text)


def ready(steps: Iterable[Step], succeeded: set[str], started: set[str]) -> list[Step]:
    """Steps not yet started whose every dependency has succeeded."""
    return [s for s in steps if s.key not in started and s.key not in succeeded and all(d in succeeded for d in s.deps)]


def upstream_outputs(step: Step, outputs: dict[str, Any]) -> dict[str, Any]:
    return {dep: outputs.get(dep) for dep in step.deps}
