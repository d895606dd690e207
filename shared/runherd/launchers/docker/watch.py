"""The engine event-stream watcher: exits of watched containers, seen at once from ``die`` events.

When the stream drops it reconnects with backoff, asks the engine to replay events since the last
one it saw, and re-inspects every watched container, so an exit during the gap is still reported.
``EventWatcher`` is a mixin: DockerLauncher inherits it and owns the state it works on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiodocker import Docker
from aiodocker.events import DockerEvents
from aiodocker.exceptions import DockerError

from runherd.launchers.base import WorkerExit
from runherd.launchers.docker.config import DockerConfig
from runherd.launchers.docker.errors import _TRANSPORT_ERRORS, _is_not_found
from runherd.launchers.docker.spec import LABEL_RUN_ID
from runherd.launchers.docker.state import _Exit, _signal_reason, exit_from_state
from runherd.launchers.docker.steps import reap as reap_steps

# The package's logger, as before the split into modules: one name for all of the launcher's logs.
log = logging.getLogger("runherd.launchers.docker")


@dataclass(frozen=True)
class _Watched:
    run_id: str
    attempt: int
    name: str


class EventWatcher:
    """Watches the containers DockerLauncher launched or adopted and queues their WorkerExits."""

    # Class attributes rather than config keys: tuning knobs, not part of the public contract.
    watch_base_delay = 0.5
    watch_max_delay = 15.0
    # A stream that lived this long counts as healthy: the next loss restarts the backoff.
    watch_healthy_after = 10.0
    # How far back to replay events on reconnect, beyond the last one seen: clock slack.
    replay_margin = 2.0
    sweep_concurrency = 16
    tail_cache_size = 512

    # Set up by DockerLauncher.__init__.
    cfg: DockerConfig
    _watched: dict[str, _Watched]
    _exits: asyncio.Queue[WorkerExit]
    _stream_task: asyncio.Task[None] | None
    _events: DockerEvents | None
    _resume: asyncio.Event
    _connected: asyncio.Event
    _last_event_at: float | None
    _tails: OrderedDict[str, str]
    _closed: bool
    _orphan_tasks: set[asyncio.Task[None]]

    def _client(self) -> Docker:
        raise NotImplementedError  # DockerLauncher's

    async def _log_tail(self, ref: str) -> str:
        raise NotImplementedError  # DockerLauncher's

    async def _watch_exits(self) -> AsyncIterator[WorkerExit]:
        # One background task owns the stream; the iterator just drains what it found, so the
        # stream stays up (and exits are queued) while the consumer is busy.
        if self._stream_task is None or self._stream_task.done():
            self._stream_task = asyncio.create_task(self._stream_loop(), name="docker-watch")
        while True:
            yield await self._exits.get()

    def _watch(self, container_id: str, run_id: str, attempt: int, name: str) -> None:
        self._watched[container_id] = _Watched(run_id, attempt, name)

    @property
    def watched_count(self) -> int:
        return len(self._watched)

    @property
    def stream_connected(self) -> bool:
        """True while the event stream is open (for tests and diagnostics)."""
        return self._connected.is_set()

    async def pause_event_stream(self) -> None:
        """Drop the event stream and keep it down until ``resume_event_stream``.

        Operational and test hook: it simulates losing the engine connection, to prove that exits
        during the gap are still reported after reconnecting.
        """
        self._resume.clear()
        await self._stop_events()

    def resume_event_stream(self) -> None:
        self._resume.set()

    async def _stop_events(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            with contextlib.suppress(Exception):
                await events.stop()

    async def _stream_loop(self) -> None:
        delay = self.watch_base_delay
        while not self._closed:
            await self._resume.wait()
            started = time.monotonic()
            try:
                got_events, error = await self._stream_once()
            except Exception as exc:  # a bug must not end watching for good: log, reconnect
                log.exception("docker event stream handler failed")
                got_events, error = False, repr(exc)
            if self._closed:
                return
            if got_events or time.monotonic() - started > self.watch_healthy_after:
                delay = self.watch_base_delay
            log.warning(
                "docker event stream lost (%s); reconnecting in %.1fs, watching %d containers",
                error or "closed",
                delay,
                len(self._watched),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.watch_max_delay)

    def _since(self) -> float:
        # Replay from just before the last event seen, or from now on the first connection: the
        # sweep that follows the subscription covers anything older.
        last = self._last_event_at if self._last_event_at is not None else time.time()
        return last - self.replay_margin

    async def _stream_once(self) -> tuple[bool, str | None]:
        """One connection: subscribe, sweep, then handle die events until the stream ends."""
        # "destroy" too: a container removed without dying first (never started) is gone as well.
        filters = {"type": ["container"], "event": ["die", "destroy"], "label": [LABEL_RUN_ID]}
        events = DockerEvents(self._client())
        self._events = events
        sub = events.subscribe(filters=json.dumps(filters), since=f"{self._since():.6f}")
        task = events.task
        got_events = False
        try:
            # Sweep after subscribing: an exit after this point is in the stream (replayed from
            # `since` if the subscription is not live yet), one before it is found by inspect.
            await self._sweep(list(self._watched))
            if task is not None and not task.done():  # a refused connection ends it at once
                self._connected.set()
            while (event := await sub.get()) is not None:
                got_events = True
                try:
                    await self._on_event(event)
                except Exception:  # one odd event must not drop the stream
                    log.exception("docker event handling failed: %r", event)
        finally:
            self._connected.clear()
            if self._events is events:
                await self._stop_events()
        return got_events, self._task_error(task)

    @staticmethod
    def _task_error(task: asyncio.Future[Any] | None) -> str | None:
        if task is None or not task.done() or task.cancelled():
            return None
        exc = task.exception()
        return repr(exc) if exc is not None else None

    async def _on_event(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        cid = actor.get("ID") or event.get("id") or ""
        if "timeNano" in event:
            self._last_event_at = max(self._last_event_at or 0.0, event["timeNano"] / 1e9)
        if cid not in self._watched:
            return  # another launcher's container, or one already reported
        try:
            code = int((actor.get("Attributes") or {}).get("exitCode", ""))
        except ValueError:
            code = None
        await self._report(cid, event_exit_code=code)

    async def _sweep_if_watching(self, ids: list[str]) -> None:
        if self._stream_task is not None and not self._stream_task.done():
            await self._sweep(ids)

    async def _sweep(self, ids: list[str]) -> None:
        """Inspect containers and report those that exited (or vanished) while unobserved."""
        limit = asyncio.Semaphore(self.sweep_concurrency)

        async def one(cid: str) -> None:
            async with limit:
                await self._report(cid, only_if_exited=True)

        await asyncio.gather(*(one(cid) for cid in ids if cid in self._watched))

    async def _report(self, cid: str, *, event_exit_code: int | None = None, only_if_exited: bool = False) -> None:
        """Inspect one watched container and queue its WorkerExit if it has exited."""
        watched = self._watched.get(cid)
        if watched is None:
            return
        try:
            info = await self._client().containers.container(cid).show()
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            if not _is_not_found(exc) and only_if_exited:
                return  # cannot tell: a later sweep or check_health will
            info = None
        if info is not None:
            exit_ = exit_from_state(watched.name, info.get("State") or {})
            if exit_ is None:
                # Still running; after a die event that means a restart policy brought it back.
                return
        elif event_exit_code is not None:
            sig, reason = _signal_reason(event_exit_code)
            exit_ = _Exit(
                event_exit_code,
                sig,
                reason or (None if event_exit_code == 0 else "Error"),
                f"container {watched.name} exited with code {event_exit_code}",
            )
        else:
            exit_ = _Exit(None, None, "NotFound", f"container {watched.name} vanished: its exit status is lost")
        if self._watched.pop(cid, None) is None:
            return  # reported meanwhile by a concurrent sweep
        if self.cfg.remove_after_exit and info is not None:
            await self._capture_and_remove(cid, watched)
        log.info(
            "docker worker exited run_id=%s attempt=%s container=%s exit_code=%s reason=%s",
            watched.run_id,
            watched.attempt,
            cid[:12],
            exit_.exit_code,
            exit_.reason,
        )
        if exit_.exit_code != 0:
            self._reap_orphans_later(watched.run_id, watched.attempt)
        self._exits.put_nowait(
            WorkerExit(
                run_id=watched.run_id,
                attempt=watched.attempt,
                exit_code=exit_.exit_code,
                signal=exit_.signal,
                reason=exit_.reason,
                message=exit_.message,
            )
        )

    def _reap_orphans_later(self, run_id: str, attempt: int) -> None:
        """A worker died: its `launcher`-executor step containers run on, for a resumed attempt
        to adopt. If none is alive after the grace, the run will not come back for them."""

        async def later() -> None:
            await asyncio.sleep(self.cfg.step_orphan_grace_seconds)
            killed = await reap_steps(self._client(), run_id, attempt)
            if killed:
                log.warning("docker killed %d orphaned step containers run_id=%s", len(killed), run_id)

        task = asyncio.ensure_future(later())
        self._orphan_tasks.add(task)
        task.add_done_callback(self._orphan_tasks.discard)

    async def _capture_and_remove(self, cid: str, watched: _Watched) -> None:
        try:
            self._remember_tail(cid, await self._log_tail(cid))
            await self._client().containers.container(cid).delete(force=True)
        except (DockerError, *_TRANSPORT_ERRORS) as exc:
            log.warning(
                "docker could not remove exited container run_id=%s attempt=%s: %s",
                watched.run_id,
                watched.attempt,
                exc,
            )

    def _remember_tail(self, cid: str, tail: str) -> None:
        self._tails[cid] = tail
        while len(self._tails) > self.tail_cache_size:
            self._tails.popitem(last=False)
