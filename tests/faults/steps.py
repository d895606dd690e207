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
