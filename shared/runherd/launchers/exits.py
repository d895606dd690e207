"""Waiting for a process to exit without a thread per process: a pidfd in the event loop.

asyncio's default child watcher on Python 3.11 parks one thread in ``waitpid`` per child; a
thousand workers dying at once (a mass timeout, a crash storm) then wake a thousand threads that
fight the event loop for the GIL. A pidfd is readable once its process has exited, whether or not
it is our child, so one epoll serves every worker; our own children are then reaped with one
non-blocking ``waitpid``.
"""

from __future__ import annotations

import asyncio
import os


async def exited(pid: int) -> bool:
    """Wait until process ``pid`` exits. False if there was no such process to begin with."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return True


async def reap(pid: int) -> int:
    """Wait for our child ``pid`` to exit and reap it; its return code as asyncio gives it (the exit
    code, or minus the signal that killed it)."""
    await exited(pid)
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - non-blocking: it has exited
        except ChildProcessError:
            return 255  # reaped by someone else: the code is lost
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(0.01)  # readable a moment before it can be reaped
