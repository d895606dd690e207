"""The public contract of DESIGN.md: statuses, tags, message bodies and their validation.

Pure: no I/O. Every message body carries ``"v": 1``; validation returns typed values or raises
InvalidMessage with a sentence that ends up in the dead letter's ``x-runherd-error`` header.
"""

from __future__ import annotations

import enum
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from runherd import execution, step_retry
from runherd.errors import InvalidMessage

VERSION = 1


class RunStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    CANCELING = "CANCELING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED})
IN_FLIGHT = frozenset({RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING})

# The state machine, written once: target -> the statuses it may come from. Every transition
# in the store is a compare-and-set against exactly these sets.
ALLOWED_FROM: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.STARTING: frozenset({RunStatus.QUEUED}),
    RunStatus.STARTED: frozenset({RunStatus.STARTING}),
    RunStatus.SUCCESS: frozenset({RunStatus.STARTED}),
    RunStatus.FAILURE: frozenset({RunStatus.STARTING, RunStatus.STARTED}),
    RunStatus.CANCELING: frozenset({RunStatus.QUEUED, RunStatus.STARTING, RunStatus.STARTED}),
    RunStatus.CANCELED: frozenset({RunStatus.QUEUED, RunStatus.CANCELING}),
}


def can_transition(current: RunStatus, target: RunStatus) -> bool:
    return current in ALLOWED_FROM.get(target, frozenset())


class StepStatus(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    SKIPPED = "SKIPPED"
    UP_FOR_RETRY = "UP_FOR_RETRY"  # a try failed; the next one follows its retry policy's delay


class EventType(enum.StrEnum):
    # from the worker
    RUN_START = "RUN_START"
    STEP_START = "STEP_START"
    STEP_SUCCESS = "STEP_SUCCESS"
    STEP_FAILURE = "STEP_FAILURE"
    STEP_SKIPPED = "STEP_SKIPPED"
    STEP_UP_FOR_RETRY = "STEP_UP_FOR_RETRY"  # data: try, next_try, max_tries, delay_seconds, retry_at, reason
    STEP_RESTARTED = "STEP_RESTARTED"  # a retry's try begins; data: try, max_tries
    RUN_SUCCESS = "RUN_SUCCESS"
    RUN_FAILURE = "RUN_FAILURE"
    RUN_CANCELED = "RUN_CANCELED"
    # from the launcher
    WORKER_EXITED = "WORKER_EXITED"


class RetryStrategy(enum.StrEnum):
    FROM_FAILURE = "FROM_FAILURE"
    ALL_STEPS = "ALL_STEPS"


# --- tags -------------------------------------------------------------------------------------

SHARD_HEADER = "runherd-shard"
"""The header carrying an event's shard (``event_shards`` > 1). Not ``x-``: a headers exchange
ignores binding keys that begin with ``x-``."""
MAX_EVENT_SHARDS = 256


def event_shard(run_id: str, shards: int) -> int:
    """The shard of a run's events: the first 8 bytes of SHA-256 of its run_id (the canonical
    lowercase UUID text), big-endian, modulo ``shards``. Stable across processes and languages."""
    digest = hashlib.sha256(run_id.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


TAG_PREFIXES = ("runherd/", "dagster/")


def tag(tags: dict[str, Any], name: str) -> Any:
    """A runherd tag by its short name, in either spelling (``runherd/`` wins)."""
    for prefix in TAG_PREFIXES:
        if prefix + name in tags:
            return tags[prefix + name]
    return None


_INT_TEXT = re.compile(r"[+-]?[0-9]{1,10}")


def _int_tag(tags: dict[str, Any], name: str) -> int | None:
    """An integer, an integral float or decimal digits (``--tag k=5``), within PostgreSQL's integer."""
    value = tag(tags, name)
    if value is None:
        return None
    if (isinstance(value, float) and value.is_integer()) or (isinstance(value, str) and _INT_TEXT.fullmatch(value)):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -_INT32 - 1 <= value <= _INT32:
        raise InvalidMessage(f"tag runherd/{name}: expected an integer from {-_INT32 - 1} to {_INT32}, got {value!r}")
    return value


def _bool_tag(tags: dict[str, Any], name: str) -> bool | None:
    value = tag(tags, name)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidMessage(f"tag runherd/{name}: expected true or false, got {value!r}")


def validate_tags(tags: dict[str, Any]) -> None:
    # Both spellings are checked, not only the one that wins: a client must not get away with a
    # bad dagster/ tag beside a good runherd/ one (docs/asyncapi.yaml describes each).
    for prefix in TAG_PREFIXES:
        spelled = {k: v for k, v in tags.items() if k.startswith(prefix)}
        for name in ("max_runtime", "priority", "max_retries", "retry_number"):
            _int_tag(spelled, name)
        _bool_tag(spelled, "retry_on_step_failure")
        step_retry.parse_tag(tag(spelled, step_retry.STEP_RETRY_TAG))
        if tag(spelled, execution.EXECUTOR_TAG) is not None:
            execution.parse_executor(tag(spelled, execution.EXECUTOR_TAG))
        if tag(spelled, execution.MAX_CONCURRENT_TAG) is not None:
            execution.parse_max_concurrent(tag(spelled, execution.MAX_CONCURRENT_TAG))
        strategy = tag(spelled, "retry_strategy")
        if strategy is not None and (not isinstance(strategy, str) or strategy not in RetryStrategy.__members__):
            raise InvalidMessage(f"tag runherd/retry_strategy: expected FROM_FAILURE or ALL_STEPS, got {strategy!r}")


def priority(tags: dict[str, Any]) -> int:
    return _int_tag(tags, "priority") or 0


def max_runtime(tags: dict[str, Any], default: float) -> float:
    """Seconds a run may stay STARTED; 0 means no limit."""
    value = _int_tag(tags, "max_runtime")
    return float(default if value is None else value)


def parse_tag_args(pairs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` from the command line."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidMessage(f"--tag {pair!r}: expected key=value")
        out[key] = value
    return out


# --- decoding helpers ---------------------------------------------------------------------------


def decode(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"body must be a JSON object, got {type(data).__name__}")
    if data.get("v") != VERSION or isinstance(data.get("v"), bool):
        raise InvalidMessage(f"v: expected {VERSION}, got {data.get('v')!r}")
    if b"\\u0000" in body and _has_nul(data):
        raise InvalidMessage("strings must not contain NUL (\\u0000): PostgreSQL cannot store it")
    return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, where: str = "") -> Any:
    if key not in data:
        raise InvalidMessage(f"{where}{key}: missing")
    value = data[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise InvalidMessage(f"{where}{key}: expected {what}, got {value!r}")
    return value


def _optional(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, where: str = "") -> Any:
    if data.get(key) is None:
        return None
    return _require(data, key, kind, what, where)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_run_id(value: Any, key: str = "run_id") -> str:
    """The RFC 4122 text form only (what other languages send), not every spelling uuid.UUID takes."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise InvalidMessage(f"{key}: expected a UUID, got {value!r}")
    return str(uuid.UUID(value))


# --- launch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    key: str
    command: list[str] | None = None
    call: str | None = None
    deps: tuple[str, ...] = ()
    timeout_seconds: float | None = None
    retry: step_retry.RetryPolicy | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "deps": list(self.deps)}
        if self.command is not None:
            out["command"] = self.command
        if self.call is not None:
            out["call"] = self.call
        if self.timeout_seconds is not None:
            out["timeout_seconds"] = self.timeout_seconds
        if self.retry is not None:
            out["retry"] = self.retry.to_json()
        return out


@dataclass(frozen=True)
class Launch:
    run_id: str
    job: str
    steps: tuple[Step, ...]
    tags: dict[str, Any] = field(default_factory=dict)
    launcher: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def parse_step(raw: Any, index: int) -> Step:
    where = f"steps[{index}]."
    if not isinstance(raw, dict):
        raise InvalidMessage(f"steps[{index}]: expected an object, got {raw!r}")
    unknown = set(raw) - {"key", "command", "call", "deps", "timeout_seconds", "retry"}
    if unknown:
        raise InvalidMessage(f"{where}{sorted(unknown)[0]}: unknown field")
    key = _require(raw, "key", str, "a string", where)
    if not key:
        raise InvalidMessage(f"{where}key: must not be empty")
    command = _optional(raw, "command", list, "a list of strings", where)
    call = _optional(raw, "call", str, "'module:function'", where)
    if (command is None) == (call is None):
        raise InvalidMessage(f"step {key!r}: needs exactly one of command or call")
    if command is not None and (not command or not all(isinstance(a, str) for a in command)):
        raise InvalidMessage(f"step {key!r}: command must be a non-empty list of strings")
    if call is not None:
        module, sep, func = call.partition(":")
        if not (sep and module and func):
            raise InvalidMessage(f"step {key!r}: call must be 'module:function', got {call!r}")
    deps = _optional(raw, "deps", list, "a list of step keys", where) or []
    if not all(isinstance(d, str) for d in deps):
        raise InvalidMessage(f"step {key!r}: deps must be a list of step keys")
    timeout = _optional(raw, "timeout_seconds", (int, float), "a number of seconds", where)
    if timeout is not None and timeout <= 0:
        raise InvalidMessage(f"step {key!r}: timeout_seconds must be positive")
    retry = step_retry.parse_policy(raw["retry"], f"{where}retry") if raw.get("retry") is not None else None
    return Step(key=key, command=command, call=call, deps=tuple(deps), timeout_seconds=timeout, retry=retry)


def parse_steps(raw: list[Any]) -> tuple[Step, ...]:
    """Steps as stored or sent, parsed (and checked) again."""
    return tuple(parse_step(s, i) for i, s in enumerate(raw))


def check_graph(steps: tuple[Step, ...]) -> list[str]:
    """Unique keys, known deps, no cycle; returns the keys in a dependency order."""
    keys = [s.key for s in steps]
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise InvalidMessage(f"duplicate step key {key!r}")
        seen.add(key)
    for step in steps:
        for dep in step.deps:
            if dep not in seen:
                raise InvalidMessage(f"step {step.key!r} depends on unknown step {dep!r}")
    return _dependency_order(keys, {s.key: s.deps for s in steps})


def _dependency_order(keys: list[str], deps: dict[str, tuple[str, ...]]) -> list[str]:
    """Depth-first, deps before dependents, in the order the steps are listed. Iterative with an
    explicit path, so a long chain of steps is refused or ordered, never a RecursionError."""
    order: list[str] = []
    done: set[str] = set()
    for root in keys:
        if root in done:
            continue
        path: list[str] = [root]
        pending = [iter(deps[root])]
        on_path = {root}
        while pending:
            dep = next(pending[-1], None)
            if dep is None:
                key = path.pop()
                pending.pop()
                on_path.discard(key)
                done.add(key)
                order.append(key)
            elif dep in on_path:
                cycle = [*path[path.index(dep) :], dep]
                raise InvalidMessage(f"steps form a cycle: {' -> '.join(cycle)}")
            elif dep not in done:
                path.append(dep)
                pending.append(iter(deps[dep]))
                on_path.add(dep)
    return order


def parse_launch(data: dict[str, Any]) -> Launch:
    unknown = set(data) - {"v", "run_id", "job", "steps", "tags", "launcher", "env"}
    if unknown:
        raise InvalidMessage(f"{sorted(unknown)[0]}: unknown field")
    run_id = parse_run_id(data["run_id"]) if data.get("run_id") is not None else str(uuid.uuid4())
    job = _require(data, "job", str, "a job name")
    if not job.strip() or len(job) > 200:
        raise InvalidMessage("job: must be a non-empty name of at most 200 characters")
    raw_steps = _require(data, "steps", list, "a list of steps")
    if not raw_steps:
        raise InvalidMessage("steps: a run needs at least one step")
    steps = parse_steps(raw_steps)
    check_graph(steps)
    tags = _optional(data, "tags", dict, "an object") or {}
    validate_tags(tags)
    env = _optional(data, "env", dict, "an object of strings") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise InvalidMessage("env: keys and values must be strings")
    launcher = _optional(data, "launcher", str, "a launcher name")
    return Launch(run_id=run_id, job=job, steps=steps, tags=tags, launcher=launcher, env=env)


@dataclass(frozen=True)
class Reexecute:
    run_id: str
    strategy: RetryStrategy
    tags: dict[str, Any]
    new_run_id: str
    # Resume-time overrides (Metaflow's resume): ["STEP=retry:N" | "STEP=timeout:S", ...] as given,
    # a new job name, the max runtime (seconds) and the executor of the new run.
    with_: tuple[str, ...] = ()
    job_name: str | None = None
    max_runtime: int | None = None
    executor: str | None = None

    def overrides(self) -> dict[str, Any]:
        """What the new run was given beyond strategy and tags, for ``runherd show``."""
        out: dict[str, Any] = {"with": list(self.with_)} if self.with_ else {}
        for key in ("job_name", "max_runtime", "executor"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


# Ids derived from an AMQP message_id: a redelivered launch or reexecute that carries no id of its
# own still names the same run, so it is applied once.
_MESSAGE_ID_NAMESPACE = uuid.UUID("5b0c1e9e-3f0e-4d55-9a7f-2f1b0f5d8a61")


def run_id_from_message_id(command: str, message_id: str) -> str:
    return str(uuid.uuid5(_MESSAGE_ID_NAMESPACE, f"{command}:{message_id}"))


def parse_reexecute(data: dict[str, Any]) -> Reexecute:
    run_id = parse_run_id(_require(data, "run_id", str, "a UUID"))
    strategy = data.get("strategy")
    strategy = "FROM_FAILURE" if strategy is None else strategy
    if not isinstance(strategy, str) or strategy not in RetryStrategy.__members__:
        raise InvalidMessage(f"strategy: expected FROM_FAILURE or ALL_STEPS, got {strategy!r}")
    tags = _optional(data, "tags", dict, "an object") or {}
    validate_tags(tags)
    new_run_id = (
        parse_run_id(data["new_run_id"], "new_run_id") if data.get("new_run_id") is not None else str(uuid.uuid4())
    )
    from runherd import overrides  # it builds on Step, defined here

    with_ = tuple(o.spec() for o in overrides.parse_list(data.get("with")))
    job_name = _optional(data, "job_name", str, "a job name")
    if job_name is not None and (not job_name.strip() or len(job_name) > 200):
        raise InvalidMessage("job_name: must be a non-empty name of at most 200 characters")
    max_runtime_ = _optional(data, "max_runtime", int, "an integer number of seconds")
    if max_runtime_ is not None and not 0 <= max_runtime_ <= _INT32:
        raise InvalidMessage(f"max_runtime: expected an integer from 0 to {_INT32}, got {max_runtime_}")
    executor = data.get("executor")
    if executor is not None:
        executor = execution.parse_executor(executor, "executor").value
    return Reexecute(
        run_id=run_id,
        strategy=RetryStrategy(strategy),
        tags=tags,
        new_run_id=new_run_id,
        with_=with_,
        job_name=job_name,
        max_runtime=max_runtime_,
        executor=executor,
    )


def parse_terminate(data: dict[str, Any]) -> str:
    return parse_run_id(_require(data, "run_id", str, "a UUID"))


# --- events and heartbeats ------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    run_id: str
    attempt: int
    seq: int
    type: EventType
    source: str = "worker"
    step_key: str | None = None
    message: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    ts: str = ""

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "v": VERSION,
                "run_id": self.run_id,
                "attempt": self.attempt,
                "seq": self.seq,
                "type": self.type.value,
                "source": self.source,
                "step_key": self.step_key,
                "message": self.message,
                "data": self.data,
                "ts": self.ts or now_iso(),
            }
        )


_INT32 = 2**31 - 1


def _counter(data: dict[str, Any], key: str, low: int) -> int:
    value = _require(data, key, int, "an integer")
    if not low <= value <= _INT32:
        raise InvalidMessage(f"{key}: expected an integer from {low} to {_INT32}, got {value}")
    return value


# RFC 3339 (offset optional: a naive time is UTC), not the many forms fromisoformat takes.
_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?")


def _timestamp(raw: str | None) -> datetime:
    if not raw:
        return datetime.now(UTC)
    try:
        if not _TS.fullmatch(raw):
            raise ValueError
        ts = datetime.fromisoformat(raw)
        # In UTC now: 0001-01-01T00:00:00+01:00 has no UTC date, and must not crash a consumer later.
        return ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidMessage(f"ts: expected an RFC 3339 timestamp, got {raw!r}") from None


def parse_event(data: dict[str, Any]) -> Event:
    kind = _require(data, "type", str, "an event type")
    if kind not in EventType.__members__:
        raise InvalidMessage(f"type: unknown event type {kind!r}")
    return Event(
        run_id=parse_run_id(data.get("run_id")),
        attempt=_counter(data, "attempt", 0),
        seq=_counter(data, "seq", 0),
        type=EventType(kind),
        source=_optional(data, "source", str, "a string") or "worker",
        step_key=_optional(data, "step_key", str, "a step key"),
        message=_optional(data, "message", str, "a string"),
        data=_optional(data, "data", dict, "an object") or {},
        ts=iso(_timestamp(_optional(data, "ts", str, "a timestamp"))),
    )


@dataclass(frozen=True)
class Heartbeat:
    run_id: str
    attempt: int
    ts: datetime


def heartbeat_body(run_id: str, attempt: int) -> bytes:
    return orjson.dumps({"v": VERSION, "run_id": run_id, "attempt": attempt, "ts": now_iso()})


def parse_heartbeat(data: dict[str, Any]) -> Heartbeat:
    ts = _timestamp(_optional(data, "ts", str, "a timestamp"))
    return Heartbeat(run_id=parse_run_id(data.get("run_id")), attempt=_counter(data, "attempt", 1), ts=ts)


# --- timestamps --------------------------------------------------------------------------------------


def now_iso() -> str:
    return iso(datetime.now(UTC))


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
