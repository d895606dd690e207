"""`call` steps of the fault suite's load. Kept free of heavy imports: each call is a process."""

from __future__ import annotations

import os
import time
from typing import Any


def nap(inputs: dict[str, Any]) -> dict[str, float]:
    """Sleeps $FAULT_NAP seconds (the launch's env) and says so."""
    seconds = float(os.environ.get("FAULT_NAP", "1"))
    time.sleep(seconds)
    return {"napped": seconds}


def big(inputs: dict[str, Any]) -> dict[str, str]:
    """An output of $FAULT_BIG_BYTES characters (the launch's env): a large plan on a resume."""
    return {"blob": "x" * int(os.environ.get("FAULT_BIG_BYTES", "1000"))}
