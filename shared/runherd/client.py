"""The Python client of runherd: launch, cancel and re-execute runs, wait for them, follow statuses.

```python
async with await Client.connect("amqp://guest:guest@127.0.0.1:5672/") as client:
    run_id = await client.launch("nightly-etl", [Step("extract", command=["python", "-c", "print(1)"])])
    result = await client.wait(run_id, timeout=60)
```

Everything a client sends is checked here by the services' own validator (``runherd.contract``),
so a mistake is refused at once with the sentence the service would dead-letter the message with.
The module functions ``submit``, ``cancel``, ``reexecute`` and ``wait_for_terminal`` are the same
operations on an existing Broker / Store (the CLI uses them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

from runherd import contract
from runherd.broker import COMMANDS, STATUS, Broker, BrokerError, Received, Subscription
from runherd.config import DEFAULT_AMQP_URL, Config
from runherd.contract import RunStatus
from runherd.errors import InvalidMessage
from runherd.store import Store

__all__ = [
    "Client",
    "Launch",
    "RunResult",
    "RunStatus",
    "StatusChange",
    "StatusStream",
    "Step",
    "cancel",
    "reexecute",
    "submit",
    "wait_for_terminal",
]

log = logging.getLogger("runherd.client")

# How long wait() trusts the status topic alone before reading the run again (with a database).
RECHECK_SECONDS = 5.0
# Seconds between attempts to subscribe again after the connection to RabbitMQ was lost.
RESUBSCRIBE_SECONDS = 0.5
# Commands are published until confirmed through a broker outage of up to this long (they are
# idempotent: the same launch twice makes one run).
PUBLISH_PATIENCE_SECONDS = 30.0
# Message ids remembered by one status iterator, to drop a message the outbox published twice.
DEDUPE_WINDOW = 10_000


# --- builders ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a launch: exactly one of ``command`` (an argv, succeeds on exit code 0) or
    ``call`` (``"module:function"``, called with its upstream steps' outputs)."""

    key: str
    command: Sequence[str] | None = None
    call: str | None = None
    deps: Sequence[str] = ()
    timeout_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.command is not None:
            out["command"] = list(self.command)
        if self.call is not None:
            out["call"] = self.call
        if self.deps:
            out["deps"] = list(self.deps)
        if self.timeout_seconds is not None:
            out["timeout_seconds"] = self.timeout_seconds
        return out


@dataclass(frozen=True)
class Launch:
    """A launch message, checked when built by the validator the launcher service runs: a bad
    step, a cycle or a bad tag raises ``InvalidMessage`` with the service's own sentence.
    ``run_id`` is made (a UUID) when not given, so it is known before anything is sent."""

    job: str
    steps: Sequence[Step | Mapping[str, Any]]
    tags: Mapping[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    env: Mapping[str, str] = field(default_factory=dict)
    launcher: str | None = None

    def __post_init__(self) -> None:
        parsed = contract.parse_launch(self._raw())
        object.__setattr__(self, "run_id", parsed.run_id)

    def _raw(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": contract.VERSION,
            "run_id": self.run_id,
            "job": self.job,
            "steps": [s.to_json() if isinstance(s, Step) else dict(s) for s in self.steps],
            "tags": dict(self.tags),
            "env": dict(self.env),
        }
        if self.launcher is not None:
            body["launcher"] = self.launcher
        return body

    def body(self) -> bytes:
        """The launch message's JSON body."""
        return orjson.dumps(self._raw())


# --- what comes back ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """How a run ended: SUCCESS, FAILURE or CANCELED, and why (None for a plain success)."""

    run_id: str
    status: RunStatus
    reason: str | None
    attempt: int

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.SUCCESS

    def __str__(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"{self.status}{why} (attempt {self.attempt})"


@dataclass(frozen=True)
class StatusChange:
    """One message of the ``runherd.status`` topic (see the README's message contract)."""

    run_id: str
    job: str
    status: RunStatus
    previous_status: RunStatus | None
    attempt: int
    reason: str | None
    ts: str
    tags: dict[str, Any]
    parent_run_id: str | None
    message_id: str | None = None

    @property
    def resumed(self) -> bool:
        """A crashed or hung worker was replaced: the run stays STARTED with a new attempt."""
        return self.status is RunStatus.STARTED and self.previous_status is RunStatus.STARTED

    @classmethod
    def parse(cls, received: Received) -> StatusChange:
        data = contract.decode(received.body)
        try:
            previous = data.get("previous_status")
            return cls(
                run_id=str(data["run_id"]),
                job=str(data["job"]),
                status=RunStatus(data["status"]),
                previous_status=RunStatus(previous) if previous else None,
                attempt=int(data["attempt"]),
                reason=data.get("reason"),
                ts=str(data["ts"]),
                tags=dict(data.get("tags") or {}),
                parent_run_id=data.get("parent_run_id"),
                message_id=received.message_id,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidMessage(f"not a status message: {exc!r}") from None


def status_bindings(job: str | None = None, status: RunStatus | str | None = None) -> list[str]:
    """The routing keys to bind for a filter: ``<STATUS>.<job>``, ``.`` in the job becoming ``_``."""
    first = RunStatus(status).value if status is not None else "*"
    second = job.replace(".", "_") if job is not None else "#"
    return ["#"] if (first, second) == ("*", "#") else [f"{first}.{second}"]


# --- the client ---------------------------------------------------------------------------------------


class Client:
    """An async runherd client. Create it with ``await Client.connect(...)`` or
    ``await Client.from_config(config)``; use it as ``async with`` (or call ``close()``).

    ``database_url`` is optional: with it, ``wait()`` reads the run's state from PostgreSQL, so it
    also returns for a run that finished before it was called and through a broker outage; without
    it, ``wait()`` relies on the status topic alone.
    """

    def __init__(
        self, broker: Broker, store: Store | None = None, *, patience: float = PUBLISH_PATIENCE_SECONDS
    ) -> None:
        self.broker = broker
        self.store = store
        self.patience = patience

    @classmethod
    async def connect(
        cls,
        amqp_url: str = DEFAULT_AMQP_URL,
        database_url: str | None = None,
        *,
        timeout: float = 10,
        patience: float = PUBLISH_PATIENCE_SECONDS,
    ) -> Client:
        """``timeout``: seconds to connect; ``patience``: seconds a command is retried through an outage."""
        broker = await Broker.connect(amqp_url, timeout=timeout)
        try:
            store = await Store.connect(database_url, min_size=1, max_size=2) if database_url else None
        except BaseException:
            await broker.close()
            raise
        return cls(broker, store, patience=patience)

    @classmethod
    async def from_config(
        cls, config: Config, *, timeout: float = 10, patience: float = PUBLISH_PATIENCE_SECONDS
    ) -> Client:
        """The URLs of a loaded ``runherd.yaml`` (``runherd.config.load()``)."""
        return await cls.connect(config.amqp_url, config.database_url, timeout=timeout, patience=patience)

    async def close(self) -> None:
        await self.broker.close()
        if self.store is not None:
            await self.store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- commands ---------------------------------------------------------------------------------

    async def launch(
        self,
        job: str | Launch,
        steps: Sequence[Step | Mapping[str, Any]] = (),
        *,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        env: Mapping[str, str] | None = None,
        launcher: str | None = None,
    ) -> str:
        """Publish a launch (a Launch, or its parts) and return the run id. Raises InvalidMessage,
        sending nothing, when the service would refuse it. The same run_id twice makes one run."""
        if not isinstance(job, Launch):
            job = Launch(job, steps, tags=tags or {}, env=env or {}, launcher=launcher, **_given(run_id=run_id))
        await self._send("launch", job.body())
        return job.run_id

    async def cancel(self, run_id: str) -> None:
        """Ask for the run to be canceled (QUEUED -> CANCELED, or CANCELING until its worker stops).
        A run that already finished is left as it is."""
        await self._send("terminate", _terminate_body(run_id))

    async def reexecute(
        self,
        run_id: str,
        strategy: contract.RetryStrategy | str = contract.RetryStrategy.FROM_FAILURE,
        tags: Mapping[str, Any] | None = None,
        *,
        with_: Sequence[str] = (),
        job_name: str | None = None,
        max_runtime: int | None = None,
        executor: str | None = None,
    ) -> str:
        """Re-execute a run as a new run (FROM_FAILURE reuses the origin's completed steps);
        returns the new run's id. ``with_``: resume-time overrides such as ``"extract=retry:3"``,
        ``"*=timeout:600"`` for the new run only; ``job_name``, ``max_runtime`` (seconds) and
        ``executor`` likewise."""
        extra = _given(with_=list(with_) or None, job_name=job_name, max_runtime=max_runtime, executor=executor)
        body, new_run_id = _reexecute_body(run_id, str(strategy), dict(tags or {}), **extra)
        await self._send("reexecute", body)
        return new_run_id

    async def _send(self, key: str, body: bytes) -> None:
        """Publish a command, retried until confirmed through a short outage (commands are
        idempotent); BrokerError after ``patience`` seconds."""
        await self.broker.publish_until_confirmed(COMMANDS, key, body, patience=self.patience)

    # --- following runs ---------------------------------------------------------------------------

    async def wait(self, run_id: str, timeout: float | None = None) -> RunResult:
        """Wait until the run is SUCCESS, FAILURE or CANCELED; TimeoutError after ``timeout`` s.

        The status topic is subscribed first, then (with a database) the run is read, so a finish
        is seen whether it happened before or after the call; the run is read again every few
        seconds in case a status message fell into a broker outage."""
        run_id = contract.parse_run_id(run_id)
        feed = StatusStream(self.broker, [f"{s.value}.#" for s in contract.TERMINAL])
        try:
            async with asyncio.timeout(timeout):
                await feed.open()
                return await self._wait(feed, run_id)
        except TimeoutError:
            raise TimeoutError(f"run {run_id} did not finish within {timeout} s") from None
        finally:
            await feed.close()

    async def _wait(self, feed: StatusStream, run_id: str) -> RunResult:
        loop = asyncio.get_running_loop()
        while True:
            # Read the run at the start and every RECHECK_SECONDS, however busy the topic is.
            if (result := await self._read_result(run_id)) is not None:
                return result
            recheck_at = loop.time() + RECHECK_SECONDS
            with contextlib.suppress(TimeoutError):
                while True:
                    remaining = recheck_at - loop.time() if self.store is not None else None
                    change = await asyncio.wait_for(feed.__anext__(), remaining)
                    if change.run_id == run_id:
                        return RunResult(change.run_id, change.status, change.reason, change.attempt)

    async def _read_result(self, run_id: str) -> RunResult | None:
        if self.store is None:
            return None
        run = await self.store.get_run(run_id)
        if run is None or not RunStatus(run["status"]).terminal:
            return None
        return RunResult(run_id, RunStatus(run["status"]), run["reason"], run["attempt"])

    def statuses(self, job: str | None = None, status: RunStatus | str | None = None) -> StatusStream:
        """Every status change published on ``runherd.status``, optionally only of one job and/or
        one status. ``async with client.statuses(...) as changes:`` subscribes on entry (nothing
        published afterwards is missed while the connection lasts) and unsubscribes on exit;
        ``async for change in changes`` then yields StatusChange values. (A bare ``async for`` over
        ``client.statuses()`` works too, subscribing at the first iteration.)

        It survives a lost connection to RabbitMQ: it subscribes again once the connection is back
        and goes on. Its queue is private and dies with the connection, so the changes published
        while the connection is down (from the cut until the new queue is bound, typically one to
        a few seconds) are **missed**; read the runs from the database (or `runherd show`) after
        a gap if every change matters, or consume a durable queue of your own. A change published
        twice (the outbox relay crashed between publishing and deleting it) carries the same AMQP
        ``message_id`` (``status-<n>``): the stream remembers the last 10,000 ids and drops repeats.
        A resume shows as STARTED -> STARTED with the new attempt and the reason.
        """
        wanted = RunStatus(status) if status is not None else None
        return StatusStream(self.broker, status_bindings(job, wanted), job=job, status=wanted)


class StatusStream:
    """Status changes from one private subscription: filtered, deduplicated by message id, and
    subscribed again after a lost connection. Made by ``Client.statuses()``."""

    def __init__(
        self, broker: Broker, bindings: list[str], *, job: str | None = None, status: RunStatus | None = None
    ) -> None:
        self.broker = broker
        self.bindings = bindings
        self.job = job
        self.status = status
        self.subscription: Subscription | None = None
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.reconnects = 0  # how many times the connection was lost and the stream subscribed again

    async def __aenter__(self) -> StatusStream:
        await self.open()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> StatusStream:
        return self

    async def __anext__(self) -> StatusChange:
        while True:
            change = await self._next()
            # The routing key maps `.` to `_`: the job itself decides ("a.b" vs "a_b").
            if (self.job is None or change.job == self.job) and (self.status is None or change.status is self.status):
                return change

    async def open(self) -> None:
        """Subscribe, retrying until RabbitMQ is reachable again (the caller bounds the wait)."""
        await self.close()
        while True:
            try:
                self.subscription = await self.broker.follow(STATUS, self.bindings)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("status subscription not possible yet (%r); retrying", exc)
                await asyncio.sleep(RESUBSCRIBE_SECONDS)

    async def _next(self) -> StatusChange:
        while True:
            if self.subscription is None:
                await self.open()
            assert self.subscription is not None
            try:
                received = await self.subscription.__anext__()
            except BrokerError as exc:
                self.reconnects += 1
                log.warning("status subscription lost (%s); subscribing again", exc)
                await self.open()
                continue
            try:
                change = StatusChange.parse(received)
            except InvalidMessage as exc:
                log.warning("ignored a message on %s (routing key %s): %s", STATUS, received.routing_key, exc)
                continue
            if self._first_time(change.message_id):
                return change

    def _first_time(self, message_id: str | None) -> bool:
        if message_id is None:
            return True
        if message_id in self.seen:
            return False
        self.seen[message_id] = None
        if len(self.seen) > DEDUPE_WINDOW:
            self.seen.popitem(last=False)
        return True

    async def close(self) -> None:
        if self.subscription is not None:
            subscription, self.subscription = self.subscription, None
            await subscription.close()


# --- the operations on an existing broker / store (used by the CLI) ----------------------------------


async def submit(broker: Broker, launch: dict[str, Any]) -> str:
    """Validate locally (so a mistake is reported here, not dead-lettered), then publish."""
    parsed = contract.parse_launch({"v": contract.VERSION, **launch})
    body = {**launch, "v": contract.VERSION, "run_id": parsed.run_id}
    await broker.publish_command("launch", orjson.dumps(body))
    return parsed.run_id


async def cancel(broker: Broker, run_id: str) -> None:
    await broker.publish_command("terminate", _terminate_body(run_id))


async def reexecute(
    broker: Broker,
    run_id: str,
    strategy: str = "FROM_FAILURE",
    tags: dict[str, Any] | None = None,
    **overrides: Any,
) -> str:
    """``overrides``: ``with_``, ``job_name``, ``max_runtime``, ``executor`` (see Client.reexecute)."""
    body, new_run_id = _reexecute_body(run_id, strategy, tags or {}, **_given(**overrides))
    await broker.publish_command("reexecute", body)
    return new_run_id


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None), so a dataclass default applies to the rest."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _terminate_body(run_id: str) -> bytes:
    return orjson.dumps({"v": contract.VERSION, "run_id": contract.parse_run_id(run_id)})


def _reexecute_body(run_id: str, strategy: str, tags: dict[str, Any], **overrides: Any) -> tuple[bytes, str]:
    """The reexecute command, with the new run's id chosen here so the caller knows it."""
    body = {"v": contract.VERSION, "run_id": contract.parse_run_id(run_id), "strategy": strategy, "tags": tags}
    if "with_" in overrides:
        overrides["with"] = list(overrides.pop("with_"))
    body.update(overrides)
    request = contract.parse_reexecute(body)
    return orjson.dumps({**body, "new_run_id": request.new_run_id}), request.new_run_id


async def wait_for_terminal(store: Any, run_id: str, timeout: float | None = None, poll: float = 0.25) -> RunStatus:
    """Poll the run until it is SUCCESS, FAILURE or CANCELED (or the timeout passes)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        run = await store.get_run(run_id)
        if run is not None and RunStatus(run["status"]).terminal:
            return RunStatus(run["status"])
        if deadline is not None and loop.time() > deadline:
            raise TimeoutError(f"run {run_id} did not finish within {timeout} s")
        await asyncio.sleep(poll)
