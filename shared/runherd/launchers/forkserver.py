"""A warm parent for process-launcher workers: workers are forked, not booted.

A Python worker spends most of its start importing (asyncio, aio-pika, orjson, runherd): 0.13-0.17
CPU-seconds each, so 50 workers relaunched at once queue for seconds on two cores. The fork server is
one small process that has imported the worker once; each launch is a ``fork()`` of it, and the child
runs ``runherd.worker.main`` at once. Opt-in: ``run_launcher.config.fork_server: true`` (the default
worker command only; a configured ``worker_command`` or a run's own command is still exec'd).

What the process launcher guarantees stays as it is: the worker is in a process group (session) of
its own, writes to its own log, holds the attempt's worker record (its ``flock`` travels as an open
descriptor, passed over the socket), and its handle is its pid and start time. The worker's
environment is the one the launcher built, set whole in the child: nothing of the fork server's or
the launcher's own environment leaks in. The launcher watches each worker with a pidfd (it is not
the launcher's child); the fork server reaps it and reports its exit code.

The server is ``runherd.worker.forkserver`` (on the worker's side: the library never imports a
service); this module is the launcher's end and the protocol. Protocol, over a Unix socket pair:
each message is a 4-byte big-endian length and a JSON object.
Launcher -> server: ``{"id", "env", "cwd"}`` with two descriptors (the log, the worker record).
Server -> launcher: ``{"id", "pid"}`` or ``{"id", "error"}``; ``{"exit": pid, "code": returncode}``
(minus the signal number when killed by one). The server exits when the launcher's end closes; its
workers live on (a restarted launcher adopts them, as it adopts exec'd workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
from typing import Any

import orjson

log = logging.getLogger("runherd.worker.forkserver")

LEN = struct.Struct(">I")
# What the fork server itself gets in its environment (it imports modules, nothing else).
_SERVER_ENV = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "HOME", "TMPDIR")


def frame(message: dict[str, Any]) -> bytes:
    data = orjson.dumps(message)
    return LEN.pack(len(data)) + data


# --- the launcher's end ------------------------------------------------------------------------------


class ForkServer:
    """The launcher's handle on its fork server, started on first use."""

    def __init__(self, spares: int = 0) -> None:
        self.spares = spares  # children the server keeps forked ahead (runherd.worker.forkserver)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int | None]] = {}
        self._next = 0
        self._lock = asyncio.Lock()

    async def _ensure(self) -> socket.socket:
        if self._sock is not None and self._reader is not None and not self._reader.done():
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: os.environ[k] for k in _SERVER_ENV if k in os.environ}
        self._proc = subprocess.Popen(  # noqa: ASYNC220 - one fork-exec, once
            [sys.executable, "-m", "runherd.worker.forkserver", str(theirs.fileno()), str(self.spares)],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        self._sock = ours
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)  # kept: it owns the socket
        self._reader = asyncio.ensure_future(self._read(reader))
        return ours

    async def spawn(self, env: dict[str, str], log_fd: int, record_fd: int, cwd: str | None = None) -> int:
        """Fork a worker with exactly ``env``; returns its pid."""
        async with self._lock:
            sock = await self._ensure()
            self._next += 1
            ident = self._next
            reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._replies[ident] = reply
            socket.send_fds(sock, [frame({"id": ident, "env": env, "cwd": cwd})], [log_fd, record_fd])
        pid = await asyncio.wait_for(reply, 30)
        self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        return pid

    async def exit_code(self, pid: int) -> int | None:
        """The worker's return code once it has exited; None if the fork server went away first."""
        waiter = self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        try:
            return await waiter
        finally:
            self._exits.pop(pid, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size = LEN.unpack(await reader.readexactly(LEN.size))[0]
                message = orjson.loads(await reader.readexactly(size))
                if "exit" in message:
                    waiter = self._exits.setdefault(message["exit"], asyncio.get_running_loop().create_future())
                    if not waiter.done():
                        waiter.set_result(message["code"])
                    continue
                reply = self._replies.pop(message.get("id"), None)
                if reply is not None and not reply.done():
                    if "pid" in message:
                        reply.set_result(message["pid"])
                    else:
                        reply.set_exception(OSError(message.get("error", "fork server error")))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.warning("the fork server went away: %r", exc)
        finally:
            for reply in self._replies.values():
                if not reply.done():
                    reply.set_exception(OSError("the fork server went away"))
            self._replies.clear()
            for waiter in self._exits.values():
                if not waiter.done():
                    waiter.set_result(None)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._sock = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._proc.wait, 5)
