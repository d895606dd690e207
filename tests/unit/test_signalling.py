"""Process-group signals refuse the groups no caller may mean: ``killpg(1)`` is ``kill(-1)`` (every
process the caller may signal; as root, the machine) and ``killpg(0)`` the caller's own group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from runherd.signalling import may_signal_group, signal_group


@pytest.mark.parametrize("pgid", [0, 1, -1, True, None, "1234", 2.5])
def test_a_group_that_cannot_be_a_workers_own_is_refused(pgid: object, caplog: pytest.LogCaptureFixture) -> None:
    assert may_signal_group(pgid) is False
    # Signal 0 only asks whether the group exists: refused here before it is even sent.
    assert signal_group(pgid, 0) is False
    assert "refused to signal process group" in caplog.text


def test_the_callers_own_group_is_refused() -> None:
    assert signal_group(os.getpgrp(), 0) is False


def test_a_child_in_its_own_session_is_signalled_then_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert may_signal_group(child.pid)
        assert signal_group(child.pid, signal.SIGKILL) is True
        assert child.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while signal_group(child.pid, 0):  # reaped: the group is gone
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        child.kill()
