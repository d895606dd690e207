"""The plan a worker receives from the launcher (never from the database) and which steps are ready.

The plan travels as a file, never as an environment variable: Linux caps one variable at 128 KiB
and a resumed attempt carries every completed step's output. Each launcher puts the file where the
worker can read it and names it in ``RUNHERD_PLAN_FILE`` (``RUNHERD_PLAN``, the plan inline, is
still read, for launchers of one's own that cannot ship a file).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from runherd.contract import Step, check_graph, parse_steps
from runherd.errors import InvalidMessage

PLAN_ENV = "RUNHERD_PLAN"
PLAN_FILE_ENV = "RUNHERD_PLAN_FILE"

MAX_OUTPUT_BYTES = 1024 * 1024
"""The documented limit of one step's output (its JSON): over it the step fails with the reason."""
MAX_MESSAGE_BYTES = MAX_OUTPUT_BYTES + 64 * 1024
"""The largest event a worker publishes: an output at its limit plus the envelope."""


@dataclass(frozen=True)
class Plan:
    run_id: str
    attempt: int
    job: str
    steps: tuple[Step, ...]
    completed: dict[str, Any] = field(default_factory=dict)  # step key -> its recorded output
    heartbeat_interval_seconds: float = 5.0
    max_concurrent_steps: int = 4
    worker_id: str = ""  # this worker instance: its events' source is ``worker:<id>``
    # The worker's secrets travel with the plan (a private file, a Kubernetes Secret), never in
    # its environment, which every step would inherit: its broker URL and its attempt's token
    # (runherd.auth). Never in the repr.
    amqp_url: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    executor: str = "multiprocess"  # in_process | multiprocess | launcher (runherd.execution)
    # Steps that failed tries before this attempt (a crash during a retry delay): key ->
    # {"failed_tries": n, "retry_at": epoch seconds or None}. The step goes on at try n + 1.
    step_tries: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_shards: int = 1  # the deployment's event_shards: the worker marks each event's shard
    # The ``launcher`` executor on a container launcher: {"name": "docker", "config": {...}}, the
    # run launcher's own config, so the worker starts each step try as the launcher starts workers.
    step_launcher: dict[str, Any] | None = None

    @property
    def source(self) -> str:
        """The events' source: two workers of one attempt never share sequence numbers."""
        return f"worker:{self.worker_id}" if self.worker_id else "worker"

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
                "worker_id": self.worker_id,
                "amqp_url": self.amqp_url,
                "token": self.token,
                "executor": self.executor,
                "step_tries": self.step_tries,
                **({"event_shards": self.event_shards} if self.event_shards > 1 else {}),
                **({"step_launcher": self.step_launcher} if self.step_launcher else {}),
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
        worker_id=str(raw.get("worker_id") or ""),
        amqp_url=str(raw.get("amqp_url") or ""),
        token=str(raw.get("token") or ""),
        executor=str(raw.get("executor") or "multiprocess"),
        step_tries=dict(raw.get("step_tries") or {}),
        event_shards=max(1, int(raw.get("event_shards") or 1)),
        step_launcher=raw.get("step_launcher") if isinstance(raw.get("step_launcher"), dict) else None,
    )


def compress(text: str) -> bytes:
    """The plan as a Kubernetes Secret carries it: gzip, since a Secret holds at most 1 MiB."""
    return gzip.compress(text.encode(), compresslevel=6, mtime=0)


def read_file(path: str) -> str:
    """A plan file, plain or gzip-compressed (told apart by the gzip magic)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidMessage(f"{PLAN_FILE_ENV}: cannot read the plan {path}: {exc.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode()


def from_env() -> Plan:
    path = os.environ.get(PLAN_FILE_ENV)
    if path:
        return from_json(read_file(path))
    text = os.environ.get(PLAN_ENV)
    if not text:
        raise InvalidMessage(f"{PLAN_FILE_ENV} is not set: `runherd worker` is started by a run launcher")
    return from_json(text)


def ready(steps: Iterable[Step], succeeded: set[str], started: set[str]) -> list[Step]:
    """Steps not yet started whose every dependency has succeeded."""
    return [s for s in steps if s.key not in started and s.key not in succeeded and all(d in succeeded for d in s.deps)]


def upstream_outputs(step: Step, outputs: dict[str, Any]) -> dict[str, Any]:
    return {dep: outputs.get(dep) for dep in step.deps}
