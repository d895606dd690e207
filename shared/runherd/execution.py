"""How a run's steps execute: the executor and its concurrency, chosen by tag with a config default.

Pure: the tags ``runherd/executor`` (``in_process`` | ``multiprocess`` | ``launcher``) and
``runherd/max_concurrent`` choose; ``execution.executor`` and ``execution.max_concurrent`` in
runherd.yaml are the defaults. Dagster's names: ``in_process``, ``multiprocess`` (``max_concurrent``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from runherd.errors import InvalidMessage

EXECUTOR_TAG = "executor"
MAX_CONCURRENT_TAG = "max_concurrent"
MAX_CONCURRENT_LIMIT = 256


class ExecutorName(enum.StrEnum):
    IN_PROCESS = "in_process"
    MULTIPROCESS = "multiprocess"
    LAUNCHER = "launcher"


def parse_executor(value: Any, where: str = "tag runherd/executor") -> ExecutorName:
    if isinstance(value, str) and value in ExecutorName._value2member_map_:
        return ExecutorName(value)
    raise InvalidMessage(f"{where}: expected in_process, multiprocess or launcher, got {value!r}")


_INT_TEXT = re.compile(r"[0-9]{1,4}")


def parse_max_concurrent(value: Any, where: str = "tag runherd/max_concurrent") -> int:
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENT_LIMIT:
        raise InvalidMessage(f"{where}: expected an integer from 1 to {MAX_CONCURRENT_LIMIT}, got {value!r}")
    return value


@dataclass(frozen=True)
class Execution:
    executor: ExecutorName
    max_concurrent: int  # steps at once; in_process runs one at a time whatever this says


def choose(tag_executor: Any, tag_max_concurrent: Any, default_executor: str, default_max_concurrent: int) -> Execution:
    """The tags win over the config; ``in_process`` is one step at a time."""
    executor = parse_executor(tag_executor if tag_executor is not None else default_executor)
    limit = parse_max_concurrent(tag_max_concurrent if tag_max_concurrent is not None else default_max_concurrent)
    return Execution(executor, 1 if executor is ExecutorName.IN_PROCESS else limit)


# Run launchers on which the ``launcher`` executor starts each step try as the launcher starts
# workers (a container, a Job); on the others each try is a process group of its own.
STEP_LAUNCHERS = frozenset({"docker", "kubernetes"})


def step_launcher(executor: ExecutorName, launcher_name: str | None, launcher_config: Any) -> dict[str, Any] | None:
    """What the plan tells a ``launcher``-executor worker about starting its steps, or None."""
    if executor is not ExecutorName.LAUNCHER or launcher_name not in STEP_LAUNCHERS:
        return None
    return {"name": launcher_name, "config": dict(launcher_config or {})}
