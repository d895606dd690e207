"""The HTTP endpoint of a runherd process (on ``metrics_port``): ``/metrics`` for Prometheus,
``/healthz`` (the process is alive: its event loop answers) and ``/readyz`` (its services are
connected to RabbitMQ and PostgreSQL and consuming: 200, else 503 and one reason a line).

Served from the event loop itself, so a wedged loop fails the liveness probe, with plain asyncio
streams (no web framework for three GET routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runherd import metrics

log = logging.getLogger("runherd.probes")

# The reasons this process is not ready; empty when it is.
Readiness = Callable[[], Awaitable[list[str]]]

READY_TIMEOUT_SECONDS = 3.0
_MAX_REQUEST_BYTES = 8192


@dataclass(frozen=True)
class Observation:
    """What one service replica of this process looks like right now (gathered by the wiring)."""

    service: str  # launcher#0, monitor#1, ...
    broker_connected: bool
    database_ok: bool
    consuming: bool
    queue: str
    database_error: str = ""


def not_ready(observations: list[Observation], *, started: bool) -> list[str]:
    """The decision, pure: every reason a line; [] means ready."""
    if not started:
        return ["starting: services not connected yet"]
    reasons = []
    for o in observations:
        if not o.broker_connected:
            reasons.append(f"{o.service}: not connected to RabbitMQ")
        if not o.database_ok:
            reasons.append(f"{o.service}: PostgreSQL unreachable ({o.database_error or 'no answer'})")
        if o.broker_connected and not o.consuming:
            reasons.append(f"{o.service}: not consuming {o.queue}")
    return reasons


async def _answer(readiness: Readiness, path: str) -> tuple[int, str, bytes]:
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest()
    if path == "/healthz":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == "/readyz":
        try:
            reasons = await asyncio.wait_for(readiness(), READY_TIMEOUT_SECONDS)
        except TimeoutError:
            reasons = [f"readiness checks took longer than {READY_TIMEOUT_SECONDS:g} s"]
        except Exception as exc:  # a probe must answer, whatever a check meets
            reasons = [f"readiness check failed: {exc!r}"]
        if reasons:
            return 503, "text/plain; charset=utf-8", ("\n".join(reasons) + "\n").encode()
        return 200, "text/plain; charset=utf-8", b"ready\n"
    return 404, "text/plain; charset=utf-8", b"not found: /metrics, /healthz, /readyz\n"


async def _handle(readiness: Readiness, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or len(head) > _MAX_REQUEST_BYTES:
            status, ctype, body = 400, "text/plain", b"bad request\n"
        elif parts[0] not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"method not allowed\n"
        else:
            status, ctype, body = await _answer(readiness, parts[1].split("?", 1)[0])
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Service Unavailable"
        )
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        if parts and parts[0] != "HEAD":
            writer.write(body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


LOOP_PROBE_SECONDS = 0.25


def watch_gc_pauses(process: str = "main", observe: Callable[[str, float], None] | None = None) -> Callable[[], None]:
    """Time each collection of the cyclic garbage collector (``runherd_gc_pause_seconds``): a full
    (generation 2) collection visits every tracked object, and a process holding a million of them
    (a sim fleet of 10,000 workers) stops for a tenth of a second or more, which shows as loop lag
    and as bursts downstream. ``observe(generation, seconds)``: where each sample goes instead.
    Returns what removes the hook."""
    started: list[float] = [0.0]

    def hook(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        seconds = time.perf_counter() - started[0]
        generation = str(info.get("generation", "?"))
        if observe is not None:
            observe(generation, seconds)
        else:
            metrics.GC_PAUSE.labels(process, generation).observe(seconds)

    gc.callbacks.append(hook)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(hook)

    return remove


async def watch_loop_lag(
    name: str = "main", interval: float = LOOP_PROBE_SECONDS, observe: Callable[[float], None] | None = None
) -> None:
    """Observe how late a timer fires (``runherd_event_loop_lag_seconds``): every await of the
    process waits that long behind other callbacks, so a loop saturated by its own work shows here
    before it shows as slow database or broker calls. ``observe``: where each sample goes instead
    (a sim fleet process sends them to the launcher, whose /metrics shows them)."""
    loop = asyncio.get_running_loop()
    record = observe or metrics.LOOP_LAG.labels(name).observe
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        record(max(0.0, loop.time() - due))


async def serve(port: int, readiness: Readiness, host: str = "0.0.0.0") -> asyncio.Server:
    """Listen on ``port``; close the returned server to stop."""
    server = await asyncio.start_server(lambda r, w: _handle(readiness, r, w), host, port)
    log.info("metrics and probes on http://%s:%d/ (/metrics, /healthz, /readyz)", host, port)
    return server
