"""The fork server itself: the warm parent of process-launcher workers (its launcher's end and the
protocol are in shared/runherd/launchers/forkserver.py, which starts it as ``python -m
runherd.worker.forkserver <socket fd>``)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
from typing import Any

import orjson

from runherd.launchers.forkserver import LEN, frame


def serve(sock: socket.socket) -> None:
    """Pre-import the worker, then fork one worker per request until the launcher goes away."""
    import runherd.worker.main  # noqa: F401 - the point: import once, fork many

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    buf = b""
    pending: list[int] = []  # descriptors received, in request order
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap_all(sock)
        if sock.fileno() in ready:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
            if not data:
                return  # the launcher is gone
            buf += data
            pending += fds
            while len(buf) >= LEN.size and len(buf) >= LEN.size + LEN.unpack_from(buf)[0]:
                size = LEN.unpack_from(buf)[0]
                request = orjson.loads(buf[LEN.size : LEN.size + size])
                buf = buf[LEN.size + size :]
                mine, pending = pending[:2], pending[2:]
                _fork(sock, request, mine, (wake_r, wake_w))


def _reap_all(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.sendall(frame({"exit": pid, "code": os.waitstatus_to_exitcode(status)}))


def _fork(sock: socket.socket, request: dict[str, Any], fds: list[int], wake: tuple[int, int]) -> None:
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        sock.sendall(frame({"id": request.get("id"), "error": "expected two descriptors (log, record)"}))
        return
    log_fd, record_fd = fds
    try:
        pid = os.fork()
    except OSError as exc:
        sock.sendall(frame({"id": request.get("id"), "error": f"fork: {exc.strerror}"}))
        pid = -1
    if pid == 0:
        _child(sock, request, log_fd, record_fd, wake)  # never returns
    os.close(log_fd)
    os.close(record_fd)  # the worker holds its copy, and with it the lock
    if pid > 0:
        sock.sendall(frame({"id": request["id"], "pid": pid}))


def _child(sock: socket.socket, request: dict[str, Any], log_fd: int, record_fd: int, wake: tuple[int, int]) -> None:
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in wake:
            os.close(fd)
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
        # record_fd stays open in this process: the worker record's lock lives with the worker.
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
    serve(socket.socket(fileno=int(sys.argv[1])))
