"""`runherd worker`: executes one attempt of a run and reports on the broker.

It skips the steps the plan lists as completed (reusing their outputs), runs the rest in
dependency order under the plan's executor (runherd.worker.executors), emits lifecycle events with a
per-attempt sequence number and heartbeats every interval. On SIGTERM it stops its steps,
reports RUN_CANCELED and exits. It never touches PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from runherd.broker import Broker
from runherd.config import DEFAULT_AMQP_URL
from runherd.launchers.process import record_self
from runherd.plan import PLAN_ENV, PLAN_FILE_ENV, Plan, from_env
from runherd.reporting import Reporter
from runherd.worker import logcap
from runherd.worker.executors import Executor

log = logging.getLogger("runherd.worker")

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_REPORT_FAILED = 3
EXIT_CANCELED = 143


async def run(plan: Plan, amqp_url: str, *, handle_sigterm: bool = True) -> int:
    broker = await Broker.connect(amqp_url, declare=False)
    reporter = Reporter(broker, plan, on_beat=logcap.CAP.check)  # the worker's own lines count too
    env = {k: v for k, v in os.environ.items() if k not in (PLAN_ENV, PLAN_FILE_ENV)}
    executor = Executor(plan, reporter.emit, env)
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
