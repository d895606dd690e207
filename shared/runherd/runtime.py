"""Running a service: logging, signals, and supervised tasks that shut down in a fixed order.

A side task that crashes stops the whole service loudly (exit code 1) instead of leaving it half
alive; SIGTERM/SIGINT set the stop event, consumers finish the batch in hand, then connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

log = logging.getLogger("runherd")

T = TypeVar("T")
LOOP_ENV = "RUNHERD_EVENT_LOOP"


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the event loop ``RUNHERD_EVENT_LOOP`` names: ``asyncio`` (the default) or
    ``uvloop`` (the optional extra ``runherd[uvloop]``)."""
    choice = os.environ.get(LOOP_ENV, "asyncio").strip().lower() or "asyncio"
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            missing = f"runherd: {LOOP_ENV}=uvloop, but uvloop is not installed (pip install 'runherd[uvloop]')"
            raise SystemExit(missing) from None
        return uvloop.run(main)
    if choice != "asyncio":
        main.close()
        raise SystemExit(f"runherd: {LOOP_ENV}: expected asyncio or uvloop, not {choice!r}")
    return asyncio.run(main)


_FIELD = re.compile(r"\b(run_id|attempt|step|job|reason)=([^\s,;:]+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the ``run_id=… attempt=…`` of a message become fields of their own,
    so a log pipeline can filter one run's story without parsing text."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in _FIELD.findall(message):
            entry.setdefault(key, int(value) if key == "attempt" and value.isdigit() else value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)


class Supervisor:
    """Owns a service's tasks. ``wait`` returns when stop is set or a task fails."""

    def __init__(self, stop: asyncio.Event | None = None) -> None:
        self.stop = stop or asyncio.Event()
        self.tasks: dict[asyncio.Task[None], str] = {}
        self.failure: BaseException | None = None

    def spawn(self, name: str, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks[task] = name
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stop.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s crashed: %r; stopping the service", self.tasks.get(task), exc, exc_info=exc)
            self.failure = exc
        self.stop.set()

    async def wait(self, grace: float = 10.0) -> None:
        await self.stop.wait()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            for task in still:
                with contextlib.suppress(BaseException):
                    await task


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def sleep_or_stop(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Wait ``seconds``, or less if ``stop`` (or ``wake``) is set."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if wake is not None:
        wake.clear()


async def retrying(what: str, fn: Callable[[], Awaitable[None]], stop: asyncio.Event, backoff: float = 1.0) -> None:
    """Run ``fn`` until stop; transient failures (a lost connection) are logged and retried."""
    while not stop.is_set():
        try:
            await fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %r; retrying in %.1f s", what, exc, backoff)
            await sleep_or_stop(stop, backoff)
