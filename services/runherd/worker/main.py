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
from collections.abc import Mapping

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
    env = step_environment(os.environ)
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
        await executor.close()
        await broker.close()


# The worker's own secrets: a step's environment is the worker's less these (issue 9), its broker
# URL and its plan (which holds the URL and its token). Its record and log cap are no secret: a
# detached step (the launcher executor) reads the record's path to know whether a worker is alive.
# RUNHERD_DOCKER_URL: the engine a `launcher`-executor worker on Docker starts its steps through.
WORKER_ONLY_ENV = frozenset({"RUNHERD_AMQP_URL", PLAN_ENV, PLAN_FILE_ENV, "RUNHERD_DOCKER_URL"})


def step_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in WORKER_ONLY_ENV}


def _forget_plan_file() -> None:
    """The plan holds the worker's broker password and token: once read, the file goes, so a
    step cannot read it back (a read-only mount, as on Kubernetes, stays)."""
    path = os.environ.get(PLAN_FILE_ENV)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    plan = from_env()
    _forget_plan_file()
    record_self(plan.worker_id)
    # An explicit RUNHERD_AMQP_URL (a wrapper's, a launcher of one's own) wins over the plan's.
    amqp_url = os.environ.get("RUNHERD_AMQP_URL") or plan.amqp_url or DEFAULT_AMQP_URL
    try:
        return asyncio.run(run(plan, amqp_url))
    except Exception:
        log.exception("worker failed to report run_id=%s attempt=%s", plan.run_id, plan.attempt)
        return EXIT_REPORT_FAILED
