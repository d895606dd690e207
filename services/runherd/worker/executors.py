"""How the worker executes its steps: the executor, and each step's tries under its retry policy.

- ``multiprocess``: each step a subprocess of the worker (its own process group, dying with the
  worker), up to ``max_concurrent`` at once;
- ``in_process``: one step at a time; a ``call`` step is called inside the worker (in a thread, so
  heartbeats go on), a ``command`` step is still a subprocess;
- ``launcher``: see runherd.worker.detached (each step in its own process group that outlives the
  worker, recorded in the events so a resumed attempt adopts it).

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
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from runherd import step_retry
from runherd.contract import EventType, Step, iso
from runherd.execution import ExecutorName
from runherd.plan import MAX_OUTPUT_BYTES, Plan, ready, upstream_outputs
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


def runner_for(executor: str, step: Step) -> StepRunner:
    if executor == ExecutorName.IN_PROCESS and step.call is not None:
        return InProcessCall(step)
    return StepProcess(step)


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
        runner: Callable[[str, Step], StepRunner] = runner_for,
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
                data = {"try": n, "max_tries": policy.max_tries, "executor": self.plan.executor}
                if n == 1:
                    await self.emit(EventType.STEP_START, step_key=step.key, data=data)
                else:
                    message = f"try {n} of {policy.max_tries}"
                    await self.emit(EventType.STEP_RESTARTED, step_key=step.key, message=message, data=data)
                runner = self.runner(self.plan.executor, step)
                self.running[step.key] = runner
                try:
                    result = await runner.run(upstream_outputs(step, self.outputs), self._step_env(step, n))
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
