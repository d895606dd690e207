"""Signalling a process group, with the two groups no caller may ever mean refused.

glibc's ``killpg(pgid, sig)`` is ``kill(-pgid, sig)``: for ``pgid`` 1 that is ``kill(-1, sig)``,
every process the caller may signal (as root, the whole machine: the database, the broker, every
shell), and for ``pgid`` 0 it is the caller's own group. A pid read from a record, a handle or a
message that came out as 0 or 1 (a worker that saw itself as pid 1 in a container, a field left at
its default) must stop there, loudly, not take the host down. Every process-group signal of runherd
goes through :func:`signal_group`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("runherd.signalling")


def may_signal_group(pgid: object) -> bool:
    """Whether ``pgid`` can name a worker's or a step's own group: an int above 1 that is not the
    caller's own group (workers and steps each start a session of their own)."""
    return isinstance(pgid, int) and not isinstance(pgid, bool) and pgid > 1 and pgid != os.getpgrp()


def signal_group(pgid: object, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``: True if it was sent, False if there is no such group,
    it is not ours to signal, or ``pgid`` is refused (logged as an error: a record is wrong)."""
    if not may_signal_group(pgid):
        log.error("refused to signal process group %r: not a worker's or a step's own group", pgid)
        return False
    assert isinstance(pgid, int)
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
