"""The process-group record of an attempt (launchers/groups.py): what is signalled, and when."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runherd.launchers import groups
from runherd.launchers.process import start_time


@pytest.mark.parametrize(
    ("recorded", "current", "expected"),
    [
        (100, None, True),  # the leader is gone: only the group's leftovers can hold its id
        (100, 100, True),  # the leader is still the recorded process
        (100, 101, False),  # the pid was reused by another process: never signalled
        (None, 101, False),  # no start time recorded and the pid is taken: not ours to say
        (None, None, True),
    ],
)
def test_may_signal(recorded: int | None, current: int | None, expected: bool) -> None:
    assert groups.may_signal(recorded, current) is expected


def test_parse_skips_bad_lines() -> None:
    assert groups.parse("12 345\n13 -\nbad\n1 5\n0 1\n14 x y\n\n15 7\n") == [(12, 345), (13, None), (15, 7)]


def test_kill_recorded_kills_the_groups_and_no_other(tmp_path: Path) -> None:
    record = tmp_path / "attempt-1.worker"
    left = subprocess.Popen(["sleep", "60"], start_new_session=True)
    spared = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        groups.note(str(record), left.pid, start_time(left.pid))
        # A group whose leader is alive but is not the recorded process (a reused pid): spared.
        groups.note(str(record), spared.pid, (start_time(spared.pid) or 0) + 1)
        assert groups.kill_recorded(record, "r", 1) == [left.pid]
        assert left.wait(timeout=5) == -9
        with pytest.raises(subprocess.TimeoutExpired):
            spared.wait(timeout=0.2)
        assert not groups.groups_path(record).exists()
        assert groups.kill_recorded(record, "r", 1) == []  # nothing recorded any more
    finally:
        for proc in (left, spared):
            if proc.poll() is None:
                os.kill(proc.pid, 9)
                proc.wait()
