"""The launcher's commands: launch, terminate, reexecute, and the internal kill. Each is validated,
then applied."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runherd import contract, execution, killing, overrides
from runherd.contract import Launch, RetryStrategy, RunStatus
from runherd.errors import InvalidMessage
from runherd.launchers import RunLauncher
from runherd.limits import DEFAULT as DEFAULT_LIMITS
from runherd.limits import Limits, check_command
from runherd.rules.retries import retry_tags
from runherd.store import RunRef, Store

log = logging.getLogger("runherd.launcher.commands")

REEXECUTED = "REEXECUTED"  # the event log's line that says what a re-executed run was given


@dataclass
class Outcome:
    """What a command left to do once its transaction committed."""

    terminate: list[RunRef] = field(default_factory=list)


async def insert_launch(
    store: Store,
    launch: Launch,
    *,
    parent_run_id: str | None = None,
    root_run_id: str | None = None,
    retry_number: int = 0,
    delay_seconds: float = 0,
    reused_steps: dict[str, Any] | None = None,
) -> bool:
    max_runtime = contract.tag(launch.tags, "max_runtime")
    inserted = await store.insert_run(
        launch,
        max_runtime_seconds=float(max_runtime) if max_runtime is not None else None,
        priority=contract.priority(launch.tags),
        parent_run_id=parent_run_id,
        root_run_id=root_run_id,
        retry_number=retry_number,
        delay_seconds=delay_seconds,
        reused_steps=reused_steps,
    )
    log.info("%s run_id=%s job=%s", "queued" if inserted else "duplicate launch ignored", launch.run_id, launch.job)
    return inserted


def parse_launch(data: Any, *, launcher: str | None, message_id: str | None, limits: Limits = DEFAULT_LIMITS) -> Launch:
    """A launch command validated (the input limits first; its run id derived from the message id
    when it has none); raises InvalidMessage naming what is wrong."""
    check_command("launch", data, limits)
    launch = contract.parse_launch(with_derived_ids("launch", data, message_id))
    if launch.launcher is not None and launcher is not None and launch.launcher != launcher:
        raise InvalidMessage(
            f"launcher: {launch.launcher!r} is not configured here (this runherd launches with {launcher!r})"
        )
    return launch


async def insert_launches(store: Store, launches: list[Launch]) -> set[str]:
    """A batch of validated launches as QUEUED runs, one transaction; the run ids inserted (a run id
    seen before, in this batch or earlier, makes no second run)."""
    rows = []
    for launch in {launch.run_id: launch for launch in reversed(launches)}.values():  # the first of each run id
        max_runtime = contract.tag(launch.tags, "max_runtime")
        rows.append((launch, float(max_runtime) if max_runtime is not None else None, contract.priority(launch.tags)))
    inserted = await store.insert_runs(rows)
    log.info("queued %d runs (%d duplicate launches ignored)", len(inserted), len(launches) - len(inserted))
    return inserted


async def apply(
    store: Store,
    key: str,
    data: dict[str, Any],
    *,
    launcher: str | None = None,
    message_id: str | None = None,
    run_launcher: RunLauncher | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Outcome:
    """``launcher``: the run launcher this service runs; a launch naming another is refused.
    ``message_id``: the AMQP message id; a launch (or reexecute) without a run id of its own gets
    one derived from it, so a redelivery after the commit makes no second run.
    ``run_launcher``: the instance itself, which carries out ``kill`` requests.
    ``limits``: the input limits, checked before anything else looks at the command."""
    if key == "launch":
        await insert_launch(store, parse_launch(data, launcher=launcher, message_id=message_id, limits=limits))
        return Outcome()
    check_command(key, data, limits)
    data = with_derived_ids(key, data, message_id)
    if key == "terminate":
        return await cancel(store, contract.parse_terminate(data))
    if key == "reexecute":
        await reexecute(store, contract.parse_reexecute(data))
        return Outcome()
    if key == killing.KILL_KEY:
        if run_launcher is None:
            raise InvalidMessage("kill: this service runs no run launcher")
        await kill(store, run_launcher, killing.parse_request(data))
        return Outcome()
    raise InvalidMessage(f"unknown command {key!r} (expected launch, terminate or reexecute)")


# Kills run in the background (a worker ignoring SIGTERM holds its grace period, which must not
# hold up launches); if this process dies first, the monitor's reap rule asks again.
_kills: dict[tuple[str, int], asyncio.Task[killing.Verdict]] = {}


async def kill(store: Store, run_launcher: RunLauncher, request: killing.KillRequest) -> None:
    await kill_many(store, run_launcher, [request])


async def kill_many(store: Store, run_launcher: RunLauncher, requests: Sequence[killing.KillRequest]) -> None:
    """Monitors that cannot reach a worker ask the launcher on its host (internal, see
    shared/killing.py): every request of a batch looked up in one statement. The stored handle is
    the one acted on, never the message's. A worker already being killed here is not killed twice:
    a storm of repeated requests (a monitor asking again while this launcher is behind) costs a
    lookup, not another grace period."""
    wanted = {(r.run_id, r.attempt): r for r in requests if (r.run_id, r.attempt) not in _kills}
    if not wanted:
        return
    async with store.tx() as tx:
        live = {(r.run_id, r.attempt): r for r in await tx.handles(sorted({k[0] for k in wanted}))}
    for key, request in wanted.items():
        ref = live.get(key)
        if ref is None:
            log.info("kill: worker already exited run_id=%s attempt=%s", request.run_id, request.attempt)
            continue
        assert ref.handle is not None
        if not run_launcher.can_reach(ref.handle):
            message = (
                f"could not terminate the worker of attempt {ref.attempt} ({request.reason}): "
                f"it runs on host {ref.handle.get('host')}, which no launcher here can reach"
            )
            await killing.record(store, ref, killing.Verdict(False, False, message), None, source="launcher")
            continue
        task = asyncio.ensure_future(
            killing.kill(run_launcher, store, ref, request.reason, grace=request.grace_seconds, source="launcher")
        )
        _kills[key] = task
        task.add_done_callback(_forget_kill(key))


def _forget_kill(key: tuple[str, int]) -> Callable[[asyncio.Task[killing.Verdict]], None]:
    def forget(_: asyncio.Task[killing.Verdict]) -> None:
        _kills.pop(key, None)

    return forget


def with_derived_ids(key: str, data: dict[str, Any], message_id: str | None) -> dict[str, Any]:
    if not message_id or not isinstance(data, dict):
        return data
    # Only an id that is absent (or null) is derived: a wrong one ("", 0, false) is refused as such.
    field = {"launch": "run_id", "reexecute": "new_run_id"}.get(key)
    if field is not None and data.get(field) is None:
        return {**data, field: contract.run_id_from_message_id(key, message_id)}
    return data


async def cancel(store: Store, run_id: str) -> Outcome:
    """QUEUED -> CANCELED at once; STARTING/STARTED -> CANCELING and the worker gets SIGTERM."""
    async with store.tx() as tx:
        run = await tx.run_for_update(run_id)
        if run is None:
            raise InvalidMessage(f"terminate: no run {run_id}")
        status = RunStatus(run["status"])
        if status is RunStatus.QUEUED:
            await tx.transition([run_id], RunStatus.CANCELED, "canceled while queued", source="launcher")
            return Outcome()
        if status not in (RunStatus.STARTING, RunStatus.STARTED):
            log.info("terminate ignored run_id=%s status=%s", run_id, status.value)
            return Outcome()
        await tx.transition([run_id], RunStatus.CANCELING, "cancel requested", source="launcher")
        handles = [h for h in await tx.handles([run_id]) if h.attempt == run["attempt"]]
    return Outcome(terminate=handles)


async def reexecute(store: Store, request: contract.Reexecute) -> None:
    """A new run linked to its origin; under FROM_FAILURE the origin's successful steps (its own and
    those it reused) are copied to the new run as reused: the worker gets their outputs and never
    executes them again. ALL_STEPS runs every step. Not a retry: the new run's retry number is 0."""
    origin = await store.get_run(request.run_id)
    if origin is None:
        raise InvalidMessage(f"reexecute: no run {request.run_id}")
    if not RunStatus(origin["status"]).terminal:
        raise InvalidMessage(
            f"reexecute: run {request.run_id} is {origin['status']}, not finished "
            "(only a SUCCESS, FAILURE or CANCELED run can be re-executed)"
        )
    reused = {}
    if request.strategy is RetryStrategy.FROM_FAILURE:
        reused = {s["step_key"]: s["output"] for s in origin["steps_status"] if s["status"] == "SUCCESS"}
    root = str(origin["root_run_id"] or request.run_id)
    given = dict(request.tags)
    if request.max_runtime is not None:
        given["runherd/max_runtime"] = request.max_runtime
    if request.executor is not None:
        given[f"runherd/{execution.EXECUTOR_TAG}"] = request.executor
    tags = retry_tags({**origin["tags"], **given}, retry_number=0, parent_run_id=request.run_id, root_run_id=root)
    steps = overrides.apply(contract.parse_steps(origin["steps"]), overrides.parse_list(list(request.with_)))
    launch = Launch(
        run_id=request.new_run_id,
        job=request.job_name or origin["job"],
        steps=steps,
        tags=tags,
        launcher=origin["launcher"],
        env=origin["env"],
    )
    inserted = await insert_launch(store, launch, parent_run_id=request.run_id, root_run_id=root, reused_steps=reused)
    if inserted:
        given_overrides = request.overrides()
        text = ", ".join(f"{k} {v}" for k, v in given_overrides.items()) or "no overrides"
        async with store.tx() as tx:
            await tx.log(
                [(launch.run_id, 0, f"re-executed from run {request.run_id} ({request.strategy.value}); {text}")],
                type_=REEXECUTED,
                source="launcher",
                data=[{"origin": request.run_id, "strategy": request.strategy.value, "overrides": given_overrides}],
            )
