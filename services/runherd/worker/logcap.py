"""Keeps the worker's log file under a cap: the process launcher's per-attempt log is bounded.

The process launcher opens ``attempt-N.log`` in append mode and makes it the worker's stdout and
stderr, and names the cap in ``RUNHERD_LOG_MAX_BYTES``. The worker (which writes its steps' stderr
to it) rotates it the way logrotate's ``copytruncate`` does: past the cap, the file's last
``max_bytes`` go to ``attempt-N.log.1`` (replacing the previous one) and the file is truncated; the
append mode makes the next write start at offset 0. So one attempt never holds more than about twice
the cap on disk. Lines written between the copy and the truncation are lost: a rotation's price.
"""

from __future__ import annotations

import contextlib
import os
import stat

LOG_MAX_ENV = "RUNHERD_LOG_MAX_BYTES"


class LogCap:
    def __init__(self, max_bytes: int, fd: int = 2) -> None:
        self.max_bytes = max_bytes
        self.fd = fd
        self.rotations = 0
        self._since_check = 0
        # Look at the file after writing this much, not after every line.
        self._check_every = max(4096, max_bytes // 16)

    @classmethod
    def from_env(cls, fd: int = 2) -> LogCap:
        try:
            max_bytes = int(os.environ.get(LOG_MAX_ENV) or 0)
        except ValueError:
            max_bytes = 0
        return cls(max_bytes, fd)

    def note(self, written: int) -> None:
        """Count bytes written to the log; rotate when due."""
        self._since_check += written
        if self._since_check >= self._check_every:
            self.check()

    def check(self) -> bool:
        """Rotate the log if it passed the cap; True if it did. Never raises: a log is not worth
        a failed run."""
        self._since_check = 0
        if self.max_bytes <= 0:
            return False
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size <= self.max_bytes:
                return False
            path = os.readlink(f"/proc/self/fd/{self.fd}")
            self._copy_tail(path, st.st_size)
            os.ftruncate(self.fd, 0)
        except OSError:
            return False
        self.rotations += 1
        return True

    def _copy_tail(self, path: str, size: int) -> None:
        keep = min(size, self.max_bytes)
        with open(path, "rb") as src:
            src.seek(size - keep)
            data = src.read(keep)
        tmp = f"{path}.1.tmp"
        with open(tmp, "wb") as dst:
            dst.write(data)
        os.replace(tmp, f"{path}.1")


CAP = LogCap.from_env()


def note(written: int) -> None:
    with contextlib.suppress(Exception):
        CAP.note(written)
