"""The fault suite's load: at least 100 runs published directly on the broker.

A mix that exercises the whole run path while staying cheap on CPU (each run is one worker, a Python
process; a `call` step is one more): command steps that sleep, `call` steps, failing steps, and a few
flaky runs with a retry (their first run fails, the retry succeeds). Most runs take 1-2 s; one in ten
takes 5-7 s, longer than the heartbeat timeout.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from runherd.broker import COMMANDS, Broker

KINDS = ("command", "long", "call", "fails", "flaky")


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    kind: str
    body: dict[str, Any]
    expected: str  # the final status of the run's lineage (the run, or its last retry)
    message_id: str | None = None  # the AMQP message_id it is published with (none by default)


@dataclass
class Load:
    specs: list[RunSpec]
    published: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        counts = {kind: 0 for kind in KINDS}
        for spec in self.specs:
            counts[spec.kind] = counts.get(spec.kind, 0) + 1
        return {"runs": len(self.specs), **counts}

    def describe(self) -> str:
        s = self.summary()
        others = "".join(f", {n} {kind}" for kind, n in s.items() if kind not in ("runs", *KINDS))
        return (
            f"{s['runs']} runs ({s['command']} command 1-2 s, {s['long']} command 5-7 s, {s['call']} call then "
            f"command 1-2 s, {s['fails']} failing, {s['flaky']} flaky with 1 retry{others})"
        )

    async def publish(self, broker: Broker, specs: list[RunSpec] | None = None) -> None:
        for spec in specs if specs is not None else self.specs:
            await broker.publish(COMMANDS, "launch", orjson.dumps(spec.body), message_id=spec.message_id)
            if spec.run_id not in self.published:
                self.published.append(spec.run_id)


def _sleep(seconds: float, then: str = "") -> list[str]:
    return ["sh", "-c", f"sleep {seconds:.2f}{'; ' + then if then else ''}"]


def _spec(index: int, marker: str, marks: Path, rng: random.Random) -> RunSpec:
    run_id = str(uuid.uuid4())
    slot = index % 20
    env = {"RUNHERD_FAULTS": marker}
    tags: dict[str, Any] = {"runherd/max_retries": 0}
    if slot < 9:
        kind, expected = "command", "SUCCESS"
        steps = [
            {"key": "extract", "command": _sleep(rng.uniform(0.4, 1.0))},
            {"key": "load", "command": _sleep(rng.uniform(0.3, 0.8)), "deps": ["extract"]},
        ]
    elif slot < 11:
        # Longer than the heartbeat timeout: a stall of the heartbeat pipeline has live runs to wrong.
        kind, expected = "long", "SUCCESS"
        steps = [
            {"key": "extract", "command": _sleep(rng.uniform(2.5, 3.5))},
            {"key": "load", "command": _sleep(rng.uniform(2.5, 3.5)), "deps": ["extract"]},
        ]
    elif slot < 16:
        kind, expected = "call", "SUCCESS"
        env["FAULT_NAP"] = f"{rng.uniform(0.5, 1.2):.2f}"
        steps = [
            {"key": "nap", "call": "tests.faults.steps:nap", "timeout_seconds": 30},
            {"key": "work", "command": _sleep(rng.uniform(0.3, 0.8)), "deps": ["nap"]},
        ]
    elif slot < 19:
        kind, expected = "fails", "FAILURE"
        steps = [
            {"key": "extract", "command": _sleep(rng.uniform(0.4, 1.0))},
            {"key": "broken", "command": _sleep(0.3, "echo 'no such table' >&2; exit 3"), "deps": ["extract"]},
            {"key": "never", "command": ["true"], "deps": ["broken"]},
        ]
    else:
        # Fails the first time it runs anywhere (a mark file per run), succeeds after: the run fails,
        # its retry (FROM_FAILURE, reusing `extract`) succeeds.
        kind, expected = "flaky", "SUCCESS"
        mark = marks / run_id
        tags = {"runherd/max_retries": 1, "runherd/retry_strategy": "FROM_FAILURE"}
        steps = [
            {"key": "extract", "command": _sleep(rng.uniform(0.4, 1.0))},
            {
                "key": "flaky",
                "command": _sleep(0.3, f"test -e {mark} || {{ touch {mark}; exit 4; }}"),
                "deps": ["extract"],
            },
        ]
    body = {"v": 1, "run_id": run_id, "job": f"faults-{kind}", "steps": steps, "tags": tags, "env": env}
    return RunSpec(run_id=run_id, kind=kind, body=body, expected=expected)


def make_load(n: int, marker: str, marks: Path, seed: int = 8) -> Load:
    """``n`` runs (at least 100 in a scenario); ``marker`` goes into every worker's environment so
    the suite can find (and clean up) its processes."""
    marks.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    specs = [_spec(i, marker, marks, rng) for i in range(n)]
    rng.shuffle(specs)
    return Load(specs)
