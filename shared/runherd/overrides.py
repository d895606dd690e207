"""Resume-time overrides (Metaflow's ``resume --with``): ``STEP=retry:N`` and ``STEP=timeout:S``.

Pure. ``runherd reexecute RUN_ID --with extract=retry:3 --with '*=timeout:600'`` and the
``reexecute`` message's ``"with": [...]`` carry the same strings. ``*`` is every step; a step named
on its own wins over ``*`` whatever the order. They change the new run's steps only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from runherd.contract import Step
from runherd.errors import InvalidMessage
from runherd.step_retry import MAX_RETRIES_LIMIT, NO_RETRY, RetryPolicy

MAX_OVERRIDES = 256
_SPEC = re.compile(r"(?P<step>[^=]+)=(?P<kind>retry|timeout):(?P<value>[^:]+)")
_RETRIES = re.compile(r"[0-9]{1,3}")
_SECONDS = re.compile(r"[0-9]{1,7}(\.[0-9]{1,3})?")


@dataclass(frozen=True)
class Override:
    step: str  # a step key, or "*"
    kind: str  # retry | timeout
    value: float

    def spec(self) -> str:
        """As given, normalised (``600.0`` -> ``600``), and parsed back to the same override."""
        value = f"{self.value:.3f}".rstrip("0").rstrip(".")
        return f"{self.step}={self.kind}:{value}"


def parse_spec(text: Any, where: str = "with") -> Override:
    if not isinstance(text, str):
        raise InvalidMessage(f"{where}: expected 'STEP=retry:N' or 'STEP=timeout:SECONDS', got {text!r}")
    match = _SPEC.fullmatch(text)
    if not match:
        raise InvalidMessage(f"{where}: expected 'STEP=retry:N' or 'STEP=timeout:SECONDS', got {text!r}")
    step, kind, value = match["step"], match["kind"], match["value"]
    if kind == "retry":
        if not _RETRIES.fullmatch(value) or int(value) > MAX_RETRIES_LIMIT:
            raise InvalidMessage(f"{where} {text!r}: retry takes a number of retries from 0 to {MAX_RETRIES_LIMIT}")
        return Override(step, kind, int(value))
    if not _SECONDS.fullmatch(value) or float(value) <= 0:
        raise InvalidMessage(f"{where} {text!r}: timeout takes a positive number of seconds")
    return Override(step, kind, float(value))


def parse_list(raw: Any) -> tuple[Override, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidMessage(f"with: expected a list of 'STEP=retry:N' or 'STEP=timeout:SECONDS', got {raw!r}")
    if len(raw) > MAX_OVERRIDES:
        raise InvalidMessage(f"with: at most {MAX_OVERRIDES} overrides, got {len(raw)}")
    return tuple(parse_spec(item, f"with[{i}]") for i, item in enumerate(raw))


def apply(steps: tuple[Step, ...], overrides: tuple[Override, ...]) -> tuple[Step, ...]:
    """The steps with the overrides applied; a step key the run does not have is refused."""
    keys = {s.key for s in steps}
    for o in overrides:
        if o.step != "*" and o.step not in keys:
            known = ", ".join(sorted(keys))
            raise InvalidMessage(f"with {o.spec()!r}: the run has no step {o.step!r} (steps: {known})")
    ordered = [o for o in overrides if o.step == "*"] + [o for o in overrides if o.step != "*"]
    out = []
    for step in steps:
        for o in ordered:
            if o.step in ("*", step.key):
                step = _one(step, o)
        out.append(step)
    return tuple(out)


def _one(step: Step, o: Override) -> Step:
    if o.kind == "timeout":
        return replace(step, timeout_seconds=o.value)
    policy: RetryPolicy = step.retry or replace(NO_RETRY)
    return replace(step, retry=replace(policy, max_retries=int(o.value)))
