"""`runherd worker`: executes one attempt of a run and reports on the broker.

It skips the steps the plan lists as completed (reusing their outputs), runs the rest in
dependency order (independent ones concurrently, bounded), emits lifecycle events with a
per-attempt sequence number and heartbeats every interval. On SIGTERM it stops its steps,
reports RUN_CANCELED and exits. It never touches PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

from runherd.broker import Broker
from runherd.config import DEFAULT_AMQP_URL
from runherd.contract import Step
from runherd.launchers.process import record_self
from runherd.plan import PLAN_ENV, PLAN_FILE_ENV, Plan, from_env, ready, upstream_outputs
from runherd.reporting import Reporter
from runherd.worker import logcap
from runherd.worker.steps import StepProcess, StepResult

log = logging.getLogger("runherd.worker")

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_REPORT_FAILED = 3
EXIT_CANCELED = 143


class Executor:
    def __init__(self, plan: Plan, reporter: Reporter, env: dict[str, str]) -> None:
        self.plan = plan
        self.reporter = reporter
        self.env = env
        self.outputs: dict[str, Any] = dict(plan.completed)
        self.succeeded: set[str] = set(plan.completed)
        self.started: set[str] = set()
        self.failed: dict[str, str] = {}
        self.running: dict[str, StepProcess] = {}
        self._slots = asyncio.Semaphore(max(1, plan.max_concurrent_steps))

    async def run(self) -> bool:
        """Runs every step that can run; True if all succeeded."""
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
        async with self._slots:
            await self.reporter.step_start(step.key)
            process = StepProcess(step)
            self.running[step.key] = process
            try:
                result = await process.run(upstream_outputs(step, self.outputs), self._step_env(step))
            finally:
                self.running.pop(step.key, None)
            await self._report(step, result)

    async def _report(self, step: Step, result: StepResult) -> None:
        if result.ok:
            self.outputs[step.key] = result.output
            self.succeeded.add(step.key)
            await self.reporter.step_success(step.key, result.output)
        else:
            self.failed[step.key] = result.error or "failed"
            await self.reporter.step_failure(step.key, result.error)

    def _step_env(self, step: Step) -> dict[str, str]:
        return {
            **self.env,
            "RUNHERD_RUN_ID": self.plan.run_id,
            "RUNHERD_ATTEMPT": str(self.plan.attempt),
            "RUNHERD_STEP_KEY": step.key,
        }

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in list(self.running.values())), return_exceptions=True)


async def run(plan: Plan, amqp_url: str, *, handle_sigterm: bool = True) -> int:
    broker = await Broker.connect(amqp_url, declare=False)
    reporter = Reporter(broker, plan, on_beat=logcap.CAP.check)  # the worker's own lines count too
    env = {k: v for k, v in os.environ.items() if k not in (PLAN_ENV, PLAN_FILE_ENV)}
    executor = Executor(plan, reporter, env)
    canceled = asyncio.Event()
    if handle_sigterm:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, canceled.set)
    beats = asyncio.ensure_future(reporter.heartbeats())
    try:
        await reporter.run_start(os.getpid())
        work = asyncio.ensure_future(executor.run())
        stopper = asyncio.ensure_future(canceled.wait())
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if canceled.is_set():
            work.cancel()
            await executor.stop()
            await reporter.run_canceled()
            return EXIT_CANCELED
        stopper.cancel()
        if work.result():
            await reporter.run_success()
            return EXIT_SUCCESS
        await reporter.run_failure(executor.failed)
        return EXIT_FAILURE
    finally:
        beats.cancel()
        await broker.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    plan = from_env()
    record_self(plan.worker_id)
    amqp_url = os.environ.get("RUNHERD_AMQP_URL", DEFAULT_AMQP_URL)
    try:
        return asyncio.run(run(plan, amqp_url))
    except Exception:
        log.exception("worker failed to report run_id=%s attempt=%s", plan.run_id, plan.attempt)
        return EXIT_REPORT_FAILED
