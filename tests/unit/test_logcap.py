"""The worker's log cap (issue 8 item 9): copytruncate past the cap, on an append-mode file."""

from __future__ import annotations

import os
from pathlib import Path

from runherd.worker.logcap import LogCap


def test_the_log_is_rotated_past_its_cap(tmp_path: Path) -> None:
    log = tmp_path / "attempt-1.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as the launcher opens it
    try:
        cap = LogCap(max_bytes=10_000, fd=fd)
        for n in range(30):
            line = f"{n:04d}" + "x" * 995 + "\n"
            os.write(fd, line.encode())
            cap.note(len(line))
        assert cap.check() or cap.rotations  # rotated at least once on the way
        rotated = log.with_name("attempt-1.log.1").read_bytes()
        assert 0 < len(rotated) <= 10_000 and rotated.endswith(b"x\n")
        assert log.stat().st_size <= 10_000 + 4096  # one check's worth of writing past the cap
        os.write(fd, b"after\n")
        assert log.read_bytes().endswith(b"after\n")  # append mode: writes follow the truncation
    finally:
        os.close(fd)


def test_no_cap_and_no_file_mean_no_rotation(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"x" * 50_000)
        assert LogCap(max_bytes=0, fd=fd).check() is False
    finally:
        os.close(fd)
    read, write = os.pipe()
    try:
        assert LogCap(max_bytes=1, fd=write).check() is False  # a pipe (Docker, Kubernetes): not ours
    finally:
        os.close(read)
        os.close(write)
