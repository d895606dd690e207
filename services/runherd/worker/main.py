"""`runherd worker`: executes one attempt of a run and reports on the broker.

It skips the steps the plan lists as completed (reusing their outputs), runs the rest in
dependency order under the plan's executor (runherd.worker.executors), emits lifecycle events with a
per-attempt sequence number and heartbeats every interval. On SIGTERM it stops its steps,
reports RUN_CANCELED and exits. It never touches PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from runherd.broker import Broker
from runherd.config import DEFAULT_AMQP_URL
from runherd.contract import Event, EventType, heartbeat_body, now_iso
from runherd.launchers.process import record_self
from runherd.plan import PLAN_ENV, PLAN_FILE_ENV, Plan, from_env
from runherd.worker import logcap
from runherd.worker.executors import Executor

log = logging.getLogger("runherd.worker")

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_REPORT_FAILED = 3
EXIT_CANCELED = 143


class Reporter:
    """Publishes this attempt's events (with confirms) and its heartbeats."""

    def __init__(self, broker: Broker, plan: Plan) -> None:
        self.broker = broker
        self.plan = plan
        self.seq = 0
        self._lock = asyncio.Lock()

    async def emit(
        self,
        kind: EventType,
        *,
        step_key: str | None = None,
        message: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        async with self._lock:  # sequence numbers follow publish order
            self.seq += 1
            event = Event(
                run_id=self.plan.run_id,
                attempt=self.plan.attempt,
                seq=self.seq,
                type=kind,
                source=self.plan.source,
                step_key=step_key,
                message=message,
                data=data or {},
                ts=now_iso(),
            )
            await self.broker.publish_event(self.plan.run_id, event.body())
        log.info(
            "%s run_id=%s attempt=%s step=%s %s",
            kind.value,
            self.plan.run_id,
            self.plan.attempt,
            step_key or "-",
            message or "",
        )

    async def heartbeats(self) -> None:
        while True:
            logcap.CAP.check()  # the worker's own lines count too, not only its steps' stderr
            with contextlib.suppress(Exception):  # a lost heartbeat is fine; the next one follows
                await self.broker.publish_heartbeat(heartbeat_body(self.plan.run_id, self.plan.attempt))
            await asyncio.sleep(self.plan.heartbeat_interval_seconds)


async def run(plan: Plan, amqp_url: str, *, handle_sigterm: bool = True) -> int:
    broker = await Broker.connect(amqp_url, declare=False)
    reporter = Reporter(broker, plan)
    env = {k: v for k, v in os.environ.items() if k not in (PLAN_ENV, PLAN_FILE_ENV)}
    executor = Executor(plan, reporter.emit, env)
    canceled = asyncio.Event()
    if handle_sigterm:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, canceled.set)
    beats = asyncio.ensure_future(reporter.heartbeats())
    try:
        reused = sorted(plan.completed)
        await reporter.emit(
            EventType.RUN_START,
            message=f"worker pid {os.getpid()}, executor {plan.executor}"
            + (f"; reusing completed steps: {', '.join(reused)}" if reused else ""),
            data={
                "pid": os.getpid(),
                "reused": reused,
                "executor": plan.executor,
                "max_concurrent": plan.max_concurrent_steps,
            },
        )
        work = asyncio.ensure_future(executor.run())
        stopper = asyncio.ensure_future(canceled.wait())
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if canceled.is_set():
            work.cancel()
            await executor.stop()
            await reporter.emit(EventType.RUN_CANCELED, message="worker received SIGTERM")
            return EXIT_CANCELED
        stopper.cancel()
        if work.result():
            await reporter.emit(EventType.RUN_SUCCESS)
            return EXIT_SUCCESS
        failed = ", ".join(f"{k} ({v})" for k, v in executor.failed.items())
        await reporter.emit(
            EventType.RUN_FAILURE, message=f"step failed: {failed}", data={"failed_steps": sorted(executor.failed)}
        )
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
