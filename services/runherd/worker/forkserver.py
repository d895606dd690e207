"""The fork server itself: the warm parent of process-launcher workers (its launcher's end and the
protocol are in shared/runherd/launchers/forkserver.py, which starts it as ``python -m
runherd.worker.forkserver <socket fd> [<spares>]``).

Spares: a fork is cheap, but not on a busy machine in a storm. Each fork makes the server's own next
steps pay copy-on-write faults, and its children, runnable at once, take the CPU it needs for the
next fork: 50 relaunches queued behind 10-50 ms each. So the server keeps ``spares`` children
forked ahead, in idle time, each already in a session of its own and waiting on a socket of its own
for its launch (the environment, the working directory and the two descriptors). A launch hands the
request to a spare (one sendmsg) and replies with its pid at once; only when none is left does it
fork on demand. Spares are topped up once launches have been quiet for QUIET_SECONDS, so a storm's
workers do not compete with new forks for the CPU. A spare never ran anything: if the server goes
away, it exits."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time
from typing import Any

import orjson

from runherd.launchers.forkserver import LEN, frame

QUIET_SECONDS = 0.25  # launches quiet this long: the storm is over, spares may be forked again


class Spares:
    """Children forked ahead, each waiting on its end of a socket pair: pid -> the server's end."""

    def __init__(self, wanted: int, keep_closed: list[int]) -> None:
        self.wanted = wanted
        self.ready: dict[int, socket.socket] = {}
        self._keep_closed = keep_closed  # the server's descriptors a spare must not hold
        self.not_before = 0.0  # monotonic: no top-up before (a storm of launches, a failed fork)

    def top_up_in(self) -> float | None:
        """Seconds until the next spare may be forked; None if there are enough."""
        if len(self.ready) >= self.wanted:
            return None
        return max(0.0, self.not_before - time.monotonic())

    def launched(self) -> None:
        """A launch came in: more may follow (a crash storm), and a fork now would take the CPU
        their workers need. Top up once the launches have been quiet for a moment."""
        self.not_before = time.monotonic() + QUIET_SECONDS

    def fork_one(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            self.not_before = time.monotonic() + 1.0  # the machine says no (for now): try again later
            return
        if pid == 0:
            ours.close()
            for other in self.ready.values():
                other.close()  # else a sibling's EOF would never come
            _wait_for_launch(theirs, self._keep_closed)  # never returns
        theirs.close()
        self.ready[pid] = ours

    def hand_over(self, request: dict[str, Any], fds: list[int]) -> int | None:
        """The pid of the spare that took the launch, or None if none could."""
        while self.ready:
            pid = next(iter(self.ready))  # the oldest: long settled, while the newest may still be forking
            sock = self.ready.pop(pid)
            try:
                socket.send_fds(sock, [frame(request)], fds)
            except OSError:
                continue  # it died meanwhile; its exit is reaped as a spare's
            finally:
                sock.close()
            return pid
        return None

    def gone(self, pid: int) -> bool:
        """A spare exited (killed, or the machine ran out of something): not a worker's exit."""
        sock = self.ready.pop(pid, None)
        if sock is None:
            return False
        sock.close()
        return True


def serve(sock: socket.socket, spares_wanted: int = 0) -> None:
    """Pre-import the worker, then fork one worker per request until the launcher goes away."""
    import runherd.worker.main  # noqa: F401 - the point: import once, fork many

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    spares = Spares(spares_wanted, [sock.fileno(), wake_r, wake_w])
    buf = b""
    pending: list[int] = []  # descriptors received, in request order
    while True:
        # Top up the spares only when idle: a request waiting never waits for a spare's fork.
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [], spares.top_up_in())
        if not ready:
            spares.fork_one()
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap_all(sock, spares)
        if sock.fileno() in ready:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
            if not data:
                return  # the launcher is gone; so are the spares (their sockets close with us)
            buf += data
            pending += fds
            spares.launched()
            while len(buf) >= LEN.size and len(buf) >= LEN.size + LEN.unpack_from(buf)[0]:
                size = LEN.unpack_from(buf)[0]
                request = orjson.loads(buf[LEN.size : LEN.size + size])
                buf = buf[LEN.size + size :]
                mine, pending = pending[:2], pending[2:]
                _launch(sock, request, mine, spares, (wake_r, wake_w))


def _reap_all(sock: socket.socket, spares: Spares) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if spares.gone(pid):
            continue
        sock.sendall(frame({"exit": pid, "code": os.waitstatus_to_exitcode(status)}))


def _launch(
    sock: socket.socket, request: dict[str, Any], fds: list[int], spares: Spares, wake: tuple[int, int]
) -> None:
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        sock.sendall(frame({"id": request.get("id"), "error": "expected two descriptors (log, record)"}))
        return
    pid = spares.hand_over(request, fds)
    if pid is None:
        _fork(sock, request, fds, spares, wake)
        return
    for fd in fds:
        os.close(fd)  # the worker holds its copies, and with them the record's lock
    sock.sendall(frame({"id": request["id"], "pid": pid}))


def _fork(sock: socket.socket, request: dict[str, Any], fds: list[int], spares: Spares, wake: tuple[int, int]) -> None:
    log_fd, record_fd = fds
    try:
        pid = os.fork()
    except OSError as exc:
        sock.sendall(frame({"id": request.get("id"), "error": f"fork: {exc.strerror}"}))
        pid = -1
    if pid == 0:
        for other in spares.ready.values():
            other.close()
        _start(request, log_fd, [sock.fileno(), *wake])  # never returns
    os.close(log_fd)
    os.close(record_fd)  # the worker holds its copy, and with it the lock
    if pid > 0:
        sock.sendall(frame({"id": request["id"], "pid": pid}))


def _detach(keep_closed: list[int]) -> None:
    """A child's first steps: a session of its own, default signals, none of the server's descriptors."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in keep_closed:
        with contextlib.suppress(OSError):
            os.close(fd)


def _wait_for_launch(own: socket.socket, keep_closed: list[int]) -> None:
    """A spare: detached now, then blocked until its launch arrives (or the server goes away)."""
    try:
        _detach(keep_closed)
        buf = b""
        fds: list[int] = []
        while len(buf) < LEN.size or len(buf) < LEN.size + LEN.unpack_from(buf)[0]:
            data, got, _, _ = socket.recv_fds(own, 1 << 20, 2)
            if not data:
                os._exit(0)  # the server is gone: this spare was never a worker
            buf += data
            fds += got
        own.close()
        request = orjson.loads(buf[LEN.size : LEN.size + LEN.unpack_from(buf)[0]])
    except BaseException:
        os._exit(1)
    if len(fds) != 2:
        os._exit(1)
    _run(request, fds[0])


def _start(request: dict[str, Any], log_fd: int, keep_closed: list[int]) -> None:
    """A child forked for this launch."""
    try:
        _detach(keep_closed)
    except BaseException:
        os._exit(1)
    _run(request, log_fd)


def _run(request: dict[str, Any], log_fd: int) -> None:
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        os.close(log_fd)
        # The environment is the one the launcher built, whole: nothing of this server's leaks in.
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        if request.get("cwd"):
            os.chdir(request["cwd"])
        sys.argv = ["runherd", "worker"]
        # The record's descriptor stays open in this process: the worker record's lock lives with it.
        from runherd.worker.main import main

        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
