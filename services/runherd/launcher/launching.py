"""Turns claimed attempts into workers: builds each worker's plan and calls the run launcher."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from runherd import auth, contract, execution, metrics, step_retry
from runherd.auth import Keys
from runherd.config import Config
from runherd.contract import RunStatus
from runherd.errors import LaunchError
from runherd.launchers import Handle, RunLauncher, WorkerRun
from runherd.plan import Plan
from runherd.store import LaunchClaim, Store
from runherd.store.store import TransientDbError

log = logging.getLogger("runherd.launcher")

LAUNCH_ATTEMPTS = 4  # a transient launch error is retried this many times in all, with backoff
LAUNCH_LEASE_SECONDS = 60


def lease_seconds(start_timeout: float) -> float:
    """How long a launch claim is held. Well inside the start timeout, so that a launcher killed
    with claims in hand leaves time for another to launch them before the run fails as stuck
    starting; launches are idempotent per attempt, so a second claim adopts, never duplicates."""
    return min(LAUNCH_LEASE_SECONDS, max(5.0, start_timeout / 3))


MAX_CLAIMS = 64  # per round, at most; never more than there are free launch slots
MAX_HANDLES = 10_000


class HandleMap(OrderedDict[tuple[str, int], Handle]):
    """The handles of the workers this process launched or adopted, for their exit's debug info.

    Bounded: an exit that is never reported (a launcher without ``watch()``, a lost exit) would
    otherwise keep its handle for the life of the process. The oldest goes first; losing it only
    loses the log tail in that worker's WORKER_EXITED event."""

    def __init__(self, maxsize: int = MAX_HANDLES) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key: tuple[str, int], value: Handle) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


def claims_to_take(concurrency: int, in_flight: int, cap: int = MAX_CLAIMS) -> int:
    """Claim only what can be launched now: a claim waiting for a slot could outlive its lease,
    and another launcher would launch the attempt a second time."""
    return max(0, min(cap, concurrency - in_flight))


def plan_steps(steps: tuple[contract.Step, ...], tags: dict[str, Any], config: Config) -> tuple[contract.Step, ...]:
    """Each step with its effective retry policy: its own, else the run's tag, else the config's."""
    run_default = step_retry.parse_tag(contract.tag(tags, step_retry.STEP_RETRY_TAG))
    raw = config.execution.step_retry
    config_default = step_retry.parse_policy(dict(raw), "execution.step_retry") if raw is not None else None
    return tuple(replace(s, retry=step_retry.effective(s.retry, run_default, config_default)) for s in steps)


def run_execution(tags: dict[str, Any], config: Config) -> execution.Execution:
    return execution.choose(
        contract.tag(tags, execution.EXECUTOR_TAG),
        contract.tag(tags, execution.MAX_CONCURRENT_TAG),
        config.execution.executor,
        config.execution.max_concurrent,
    )


def worker_run(claim: LaunchClaim, config: Config, keys: Keys) -> WorkerRun:
    """The worker's whole contract: its plan (steps, completed outputs), its broker credentials
    (``worker_amqp_url``) and its attempt's token, which proves its events (runherd.auth).

    The plan goes in ``WorkerRun.plan``, which the launcher hands over as a file: in the
    environment a resume's completed outputs would hit Linux's 128 KiB per variable, and every
    step would inherit the credentials. ``env`` is the user's alone."""
    worker_id = uuid.uuid4().hex[:12]
    chosen = run_execution(claim.tags, config)
    plan = Plan(
        run_id=claim.run_id,
        attempt=claim.attempt,
        job=claim.job,
        steps=plan_steps(contract.parse_steps(claim.steps), claim.tags, config),
        completed=claim.completed,
        heartbeat_interval_seconds=config.run_monitoring.heartbeat_interval_seconds,
        max_concurrent_steps=chosen.max_concurrent,
        worker_id=worker_id,
        amqp_url=config.workers_amqp_url,
        token=auth.token(keys.current, auth.WORKER, claim.run_id, claim.attempt),
        executor=chosen.executor.value,
        step_tries={k: v for k, v in claim.step_tries.items() if k not in claim.completed},
        event_shards=config.event_shards,
        step_launcher=execution.step_launcher(chosen.executor, config.run_launcher.name, config.run_launcher.config),
    )
    env = dict(claim.env)
    max_runtime = contract.max_runtime(claim.tags, config.run_monitoring.max_runtime_seconds)
    return WorkerRun(
        run_id=claim.run_id,
        attempt=claim.attempt,
        job=claim.job,
        env=env,
        tags=claim.tags,
        max_runtime_seconds=int(max_runtime) if max_runtime > 0 else None,
        plan=plan.to_json(),
        worker_id=worker_id,
        executor=chosen.executor.value,
    )


async def launch_with_retries(
    launcher: RunLauncher,
    run: WorkerRun,
    backoff: float = 0.5,
    on_retry: Callable[[int, float, LaunchError], Awaitable[None]] | None = None,
) -> Handle:
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        try:
            return await launcher.launch(run)
        except LaunchError as exc:
            if not exc.transient or attempt == LAUNCH_ATTEMPTS:
                raise
            delay = backoff * 2 ** (attempt - 1)
            log.warning("transient launch error run_id=%s attempt=%s try=%s: %s", run.run_id, run.attempt, attempt, exc)
            if on_retry is not None:
                await on_retry(attempt, delay, exc)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class LaunchRecorder:
    """Worker handles recorded in batches: the launches that finish while one statement runs go
    in the next, so a storm of launches costs a statement per batch, not one per worker."""

    def __init__(self, store: Store, max_batch: int = 500) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[tuple[tuple[str, int, Handle, str], asyncio.Future[tuple[RunStatus, int] | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, run_id: str, attempt: int, handle: Handle, launcher: str) -> tuple[RunStatus, int] | None:
        """The run's status and current attempt once the handle is stored ."""
        future: asyncio.Future[tuple[RunStatus, int] | None] = asyncio.get_running_loop().create_future()
        self._pending.append(((run_id, attempt, handle, launcher), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                results = await self.store.record_launches([item for item, _ in batch])
            except BaseException as exc:  # each launch hears it (a TransientDbError: its lease brings it back)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class Launching:
    def __init__(
        self,
        config: Config,
        store: Store,
        launcher: RunLauncher,
        handles: HandleMap,
        concurrency: int | None = None,
        keys: Keys | None = None,
    ) -> None:
        self.keys = keys  # read from the store at the first launch when not given
        self.config = config
        self.store = store
        self.launcher = launcher
        self.handles = handles
        self.concurrency = launcher.launch_concurrency if concurrency is None else concurrency
        self._slots = asyncio.Semaphore(self.concurrency)
        self.recorder = LaunchRecorder(store)
        self._tasks: set[asyncio.Task[None]] = set()

    async def tick(self) -> int:
        """One round: launch every attempt waiting for a worker, dequeue what fits, and launch
        those too. (The launcher service runs the two halves in loops of their own.)"""
        claimed = await self._claim(wait=False)
        if await self.dequeue() or not claimed:
            claimed += await self._claim(wait=not claimed)
        return claimed

    async def dequeue(self) -> list[str]:
        """QUEUED -> STARTING for the runs that fit the coordinator's limits; their attempts then
        wait for ``claim_ready``."""
        coordinator = self.config.run_coordinator
        limits = [
            {"key": lim.key, "value": lim.value, "per_unique_value": lim.per_unique_value, "limit": lim.limit}
            for lim in coordinator.tag_concurrency_limits
        ]
        return await self.store.dequeue(coordinator.max_concurrent_runs, limits)

    async def claim_ready(self) -> int:
        """Claim and start launching the attempts waiting for a worker, as many as slots are free."""
        return await self._claim(wait=True)

    async def _claim(self, *, wait: bool) -> int:
        """Claim as many attempts as there are free slots and start launching them. With ``wait``
        and every slot busy, wait (a little) for one to free instead of claiming ahead."""
        free = claims_to_take(self.concurrency, self.in_flight)
        if free == 0:
            if not wait or not self._tasks:
                return 0
            await asyncio.wait(set(self._tasks), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            free = claims_to_take(self.concurrency, self.in_flight)
            if free == 0:
                return 0
        lease = lease_seconds(self.config.run_monitoring.start_timeout_seconds)
        claims = await self.store.claim_launches(free, lease_seconds=lease)
        for claim in claims:
            task = asyncio.ensure_future(self._launch(claim))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claims)

    @property
    def in_flight(self) -> int:
        return sum(1 for t in self._tasks if not t.done())

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _launch(self, claim: LaunchClaim) -> None:
        try:
            await self._launch_claim(claim)
        except TransientDbError as exc:
            # The claim's lease brings the attempt back; launching it again adopts its worker.
            log.warning(
                "launch not recorded run_id=%s attempt=%s: database unavailable (%r); retried when the claim expires",
                claim.run_id,
                claim.attempt,
                exc,
            )
        except Exception:
            log.exception("launch failed unexpectedly run_id=%s attempt=%s", claim.run_id, claim.attempt)

    async def _launch_claim(self, claim: LaunchClaim) -> None:
        async with self._slots:
            if claim.attempt != claim.current_attempt or claim.status not in (RunStatus.STARTING, RunStatus.STARTED):
                await self._never_launched(claim)
                return

            async def note_retry(try_: int, delay: float, exc: LaunchError) -> None:
                # While a launch is retried the run is STARTING: its event log says why.
                async with self.store.tx() as tx:
                    await tx.log(
                        [
                            (
                                claim.run_id,
                                claim.attempt,
                                f"launch try {try_} of {LAUNCH_ATTEMPTS} failed: {exc}; retrying in {delay:g} s",
                            )
                        ],
                        type_="LAUNCH_RETRY",
                        source="launcher",
                    )

            if self.keys is None:
                self.keys = await self.store.event_keys()
            try:
                run = worker_run(claim, self.config, self.keys)
                handle = await launch_with_retries(self.launcher, run, on_retry=note_retry)
            except Exception as exc:
                await self._failed(claim, exc)
                return
            self.handles[(claim.run_id, claim.attempt)] = handle
            now = await self.recorder.record(claim.run_id, claim.attempt, handle, self.launcher.name)
            metrics.LAUNCHES.labels(self.launcher.name, "ok").inc()
            log.info("launched run_id=%s attempt=%s handle=%s", claim.run_id, claim.attempt, handle)
            if now is not None and (now[0] is RunStatus.CANCELING or now[0].terminal or now[1] != claim.attempt):
                # A cancel (or a timeout) that arrived while we were launching found no handle.
                await self.launcher.terminate(handle)

    async def _never_launched(self, claim: LaunchClaim) -> None:
        """The run moved on before its worker started (canceled, or failed by a timeout)."""
        async with self.store.tx() as tx:
            await tx.record_exit(claim.run_id, claim.attempt, None, "never launched")
            if claim.status is RunStatus.CANCELING:
                await tx.transition(
                    [claim.run_id],
                    RunStatus.CANCELED,
                    "canceled before its worker started",
                    attempt=claim.attempt,
                    source="launcher",
                )

    async def _failed(self, claim: LaunchClaim, exc: Exception) -> None:
        reason = f"launch failed: {exc}"
        log.error("%s run_id=%s attempt=%s", reason, claim.run_id, claim.attempt)
        metrics.LAUNCHES.labels(self.launcher.name, "error").inc()
        async with self.store.tx() as tx:
            await tx.log(
                [(claim.run_id, claim.attempt, reason)],
                type_="LAUNCH_FAILED",
                source="launcher",
                data=[{"error": str(exc), "transient": getattr(exc, "transient", False)}],
            )
            await tx.transition(
                [claim.run_id],
                RunStatus.FAILURE,
                reason,
                attempt=claim.attempt,
                from_=[RunStatus.STARTING, RunStatus.STARTED],
                failure_kind="infrastructure",
                source="launcher",
            )
            await tx.record_exit(claim.run_id, claim.attempt, None, "launch failed")
