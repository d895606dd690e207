"""How the worker executes its steps: the executor, and each step's tries under its retry policy.

- ``multiprocess``: each step a subprocess of the worker (its own process group, dying with the
  worker), up to ``max_concurrent`` at once;
- ``in_process``: one step at a time; a ``call`` step is called inside the worker (in a thread, so
  heartbeats go on), a ``command`` step is still a subprocess;
- ``launcher``: each step try started through the run's launcher, outliving the worker, its handle
  in the events so a resumed attempt adopts it: on Docker a container of its own
  (runherd.worker.step_containers), on Kubernetes a Job of its own (runherd.worker.step_jobs),
  elsewhere a process group of its own (runherd.worker.detached).

A failed try is followed by another while the step's policy allows (STEP_UP_FOR_RETRY, then
STEP_RESTARTED after the delay). Each try has the step's whole timeout. A resumed attempt goes on
at the try the plan names (``Plan.step_tries``), after what is left of the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeGuard

import orjson

from runherd import step_groups, step_retry
from runherd.contract import EventType, Step, iso
from runherd.execution import ExecutorName
from runherd.launchers.process import DETACHED_STEP_ENV, start_time
from runherd.plan import MAX_OUTPUT_BYTES, Plan, ready, upstream_outputs
from runherd.signalling import signal_group
from runherd.worker.steps import StepProcess, StepResult, output_too_large


class Emit(Protocol):
    def __call__(
        self,
        kind: EventType,
        *,
        step_key: str | None = None,
        message: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> Awaitable[None]: ...


class StepRunner(Protocol):
    async def run(self, inputs: dict[str, Any], env: dict[str, str]) -> StepResult: ...

    async def stop(self, grace: float = 3.0) -> None: ...


class InProcessCall:
    """A ``call`` step called in the worker's own process, on a daemon thread.

    A thread cannot be stopped: a timed-out or canceled call is abandoned (the step fails or the
    run is canceled at once) and ends with the worker."""

    def __init__(self, step: Step) -> None:
        self.step = step

    async def run(self, inputs: dict[str, Any], env: dict[str, str]) -> StepResult:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[StepResult] = loop.create_future()
        for key in ("RUNHERD_RUN_ID", "RUNHERD_ATTEMPT", "RUNHERD_STEP_KEY", "RUNHERD_STEP_TRY"):
            os.environ[key] = env[key]  # one step at a time: the step sees its own

        def settle(result: StepResult) -> None:
            if not done.done():
                done.set_result(result)

        def target() -> None:
            result = _call(self.step.call or "", inputs)
            with contextlib.suppress(RuntimeError):  # the loop is gone: the worker is exiting
                loop.call_soon_threadsafe(settle, result)

        threading.Thread(target=target, name=f"step-{self.step.key}", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.step.timeout_seconds)
        except TimeoutError:
            return StepResult(False, error=f"timed out after {self.step.timeout_seconds:g} s")

    async def stop(self, grace: float = 3.0) -> None:
        return None


def _call(target: str, inputs: dict[str, Any]) -> StepResult:
    module_name, _, func_name = target.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(inputs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)  # type: ignore[arg-type]
        data = orjson.dumps(result)
    except Exception as exc:
        traceback.print_exc()
        return StepResult(False, error=f"{type(exc).__name__}: {exc}")
    if len(data) > MAX_OUTPUT_BYTES:
        return StepResult(False, error=output_too_large(len(data)))
    return StepResult(True, output=orjson.loads(data))


class DetachedStep:
    """One try of a step under the ``launcher`` executor: its own process group, outliving the
    worker, recorded in runherd.step_groups' files. ``adopt`` takes over what an earlier attempt
    left (a live group, or the result of a finished one) before ``spawn`` starts anything."""

    def __init__(self, plan: Plan, step: Step, try_: int) -> None:
        self.plan, self.step, self.try_ = plan, step, try_
        self.folder = step_groups.step_dir(plan.run_id)
        self.record: dict[str, Any] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.result: StepResult | None = None

    def _handle(self, adopted: bool) -> dict[str, Any]:
        assert self.record is not None
        return {
            "pid": self.record["pid"],
            "pgid": self.record["pid"],
            "host": self.record.get("host"),
            "adopted": adopted,
        }

    async def adopt(self) -> dict[str, Any] | None:
        seen = step_groups.look(self.folder, self.step.key, self.try_)
        if seen.result is not None:
            self.record = seen.record or {"pid": None}
            self.result = StepResult(bool(seen.result.get("ok")), seen.result.get("output"), seen.result.get("error"))
            return {**self._handle(True), "finished": True}
        if seen.adopt:
            self.record = {**(seen.record or {}), "owner_attempt": self.plan.attempt}
            step_groups.write_json(step_groups.record_path(self.folder, self.step.key, self.try_), self.record)
            return self._handle(True)
        return None

    async def spawn(self, inputs: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        base = step_groups.record_path(self.folder, self.step.key, self.try_)
        spec = base.with_suffix(".spec")
        result = step_groups.result_path(self.folder, self.step.key, self.try_)
        with contextlib.suppress(FileNotFoundError):
            result.unlink()
        step_groups.write_json(spec, {"step": self.step.to_json(), "inputs": inputs})
        with open(base.with_suffix(".log"), "ab") as log:  # noqa: ASYNC230 - a local file, handed to the child
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "runherd.worker.detached",
                str(spec),
                str(result),
                env={**env, DETACHED_STEP_ENV: "1"},  # not a dead worker's leftover
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own group; no PDEATHSIG: it outlives the worker
            )
        self.record = {
            "pid": self.proc.pid,
            "start_time": start_time(self.proc.pid),
            "host": socket.gethostname(),
            "started_at": time.time(),
            "owner_attempt": self.plan.attempt,
            "step_key": self.step.key,
            "try": self.try_,
        }
        step_groups.write_json(base, self.record)
        return self._handle(False)

    async def wait(self) -> StepResult:
        if self.result is not None:
            return self.result
        assert self.record is not None
        if self.proc is not None:
            await self.proc.wait()
        else:
            while step_groups.alive(self.record):  # adopted: not our child, so polled
                await asyncio.sleep(0.2)
        got = step_groups.read_json(step_groups.result_path(self.folder, self.step.key, self.try_))
        if not isinstance(got, dict):
            return StepResult(False, error=f"step process group {self.record['pid']} ended without a result")
        return StepResult(bool(got.get("ok")), got.get("output"), got.get("error"))

    async def run(self, inputs: dict[str, Any], env: dict[str, str]) -> StepResult:
        if await self.adopt() is None:
            await self.spawn(inputs, env)
        return await self.wait()

    async def stop(self, grace: float = 3.0) -> None:
        record = self.record
        if record is None or not step_groups.alive(record):
            return
        signal_group(record["pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while step_groups.alive(record) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        signal_group(record["pid"], signal.SIGKILL)


class LaunchedStep(StepRunner, Protocol):
    """A ``launcher``-executor try: found again (``adopt``) or started (``spawn``), then waited for."""

    async def adopt(self) -> dict[str, Any] | None: ...

    async def spawn(self, inputs: dict[str, Any], env: dict[str, str]) -> dict[str, Any]: ...

    async def wait(self) -> StepResult: ...


def runner_for(plan: Plan, step: Step, try_: int) -> StepRunner:
    if plan.executor == ExecutorName.LAUNCHER:
        launcher = plan.step_launcher or {}
        if launcher.get("name") == "docker":
            from runherd.worker.step_containers import ContainerStep  # aiodocker: only when used

            return ContainerStep(plan, step, try_, launcher.get("config") or {})
        if launcher.get("name") == "kubernetes":
            from runherd.worker.step_jobs import JobStep  # kubernetes_asyncio: only when used

            return JobStep(plan, step, try_, launcher.get("config") or {})
        return DetachedStep(plan, step, try_)
    if plan.executor == ExecutorName.IN_PROCESS and step.call is not None:
        return InProcessCall(step)
    return StepProcess(step)


def _launched(runner: StepRunner) -> TypeGuard[LaunchedStep]:
    return hasattr(runner, "adopt") and hasattr(runner, "spawn")


class Executor:
    """Runs every step that can run, in dependency order, under the plan's executor."""

    def __init__(
        self,
        plan: Plan,
        emit: Emit,
        env: dict[str, str],
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        runner: Callable[[Plan, Step, int], StepRunner] = runner_for,
    ) -> None:
        self.plan = plan
        self.emit = emit
        self.env = env
        self.clock = clock
        self.rand = rand
        self.runner = runner
        self.outputs: dict[str, Any] = dict(plan.completed)
        self.succeeded: set[str] = set(plan.completed)
        self.started: set[str] = set()
        self.failed: dict[str, str] = {}
        self.running: dict[str, StepRunner] = {}
        self.tries: dict[str, int] = {}  # the try each step is at
        one_at_a_time = plan.executor == ExecutorName.IN_PROCESS
        self._slots = asyncio.Semaphore(1 if one_at_a_time else max(1, plan.max_concurrent_steps))

    async def run(self) -> bool:
        """True if all steps succeeded."""
        tasks: dict[str, asyncio.Task[None]] = {}
        while True:
            if not self.failed:
                for step in ready(self.plan.steps, self.succeeded, self.started):
                    self.started.add(step.key)
                    tasks[step.key] = asyncio.ensure_future(self._run_step(step))
            pending = [t for t in tasks.values() if not t.done()]
            if not pending:
                break
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        return not self.failed and self.succeeded >= {s.key for s in self.plan.steps}

    async def _run_step(self, step: Step) -> None:
        policy = step.retry or step_retry.NO_RETRY
        earlier = self.plan.step_tries.get(step.key) or {}
        n = int(earlier.get("failed_tries") or 0) + 1
        if n > 1:  # resumed during a retry's delay (or its try): go on at that try
            await asyncio.sleep(step_retry.remaining_delay(earlier.get("retry_at"), self.clock()))
        while True:
            self.tries[step.key] = n
            async with self._slots:
                data: dict[str, Any] = {"try": n, "max_tries": policy.max_tries, "executor": self.plan.executor}
                runner = self.runner(self.plan, step, n)
                self.running[step.key] = runner
                try:
                    inputs, env = upstream_outputs(step, self.outputs), self._step_env(step, n)
                    if _launched(runner):
                        # its handle (process group, container) in the start event, for `show`
                        data["handle"] = await runner.adopt() or await runner.spawn(inputs, env)
                        await self._started(step, n, policy.max_tries, data)
                        result = await runner.wait()
                    else:
                        await self._started(step, n, policy.max_tries, data)
                        result = await runner.run(inputs, env)
                finally:
                    self.running.pop(step.key, None)
            if result.ok:
                self.outputs[step.key] = result.output
                self.succeeded.add(step.key)
                await self.emit(EventType.STEP_SUCCESS, step_key=step.key, data={"output": result.output, "try": n})
                return
            error = result.error or "failed"
            nxt = step_retry.after_failure(policy, n, self.rand())
            if not nxt.retry:
                self.failed[step.key] = error if n == 1 else f"{error}; after {n} tries"
                await self.emit(EventType.STEP_FAILURE, step_key=step.key, message=error, data={"tries": n})
                return
            retry_at = self.clock() + nxt.delay
            await self.emit(
                EventType.STEP_UP_FOR_RETRY,
                step_key=step.key,
                message=f"try {n} of {policy.max_tries} failed: {error}; try {nxt.next_try} in {nxt.delay:g} s",
                data={
                    "try": n,
                    "next_try": nxt.next_try,
                    "max_tries": policy.max_tries,
                    "delay_seconds": nxt.delay,
                    "retry_at": iso(datetime.fromtimestamp(retry_at, UTC)),
                    "retry_at_epoch": retry_at,
                    "reason": error,
                },
            )
            await asyncio.sleep(nxt.delay)
            n = nxt.next_try

    async def _started(self, step: Step, n: int, max_tries: int, data: dict[str, Any]) -> None:
        adopted = " (adopted: still running from an earlier attempt)" if data.get("handle", {}).get("adopted") else ""
        if n == 1:
            await self.emit(EventType.STEP_START, step_key=step.key, message=adopted.strip() or None, data=data)
        else:
            message = f"try {n} of {max_tries}{adopted}"
            await self.emit(EventType.STEP_RESTARTED, step_key=step.key, message=message, data=data)

    def _step_env(self, step: Step, n: int) -> dict[str, str]:
        return {
            **self.env,
            "RUNHERD_RUN_ID": self.plan.run_id,
            "RUNHERD_ATTEMPT": str(self.plan.attempt),
            "RUNHERD_STEP_KEY": step.key,
            "RUNHERD_STEP_TRY": str(n),
        }

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in list(self.running.values())), return_exceptions=True)

    @staticmethod
    async def close() -> None:
        """Release the connections the `launcher` executor opened (engine, API), if it did."""
        for name in ("runherd.worker.step_containers", "runherd.worker.step_jobs"):
            module = sys.modules.get(name)
            if module is not None:
                await module.close()
