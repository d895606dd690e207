"""`python -m runherd.worker.detached SPEC RESULT`: one try of a step under the ``launcher``
executor, as the leader of its own process group that outlives the worker.

SPEC holds the step and its inputs; the try runs as runherd.worker.steps runs any step (its
timeout included), and what it came to is written to RESULT before this process exits, for the
worker that started it or the resumed attempt that adopted it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson

from runherd.contract import parse_step
from runherd.step_groups import write_json
from runherd.worker.steps import StepProcess


def main(argv: list[str]) -> int:
    spec = orjson.loads(Path(argv[1]).read_bytes())
    step = parse_step(spec["step"], 0)
    result = asyncio.run(StepProcess(step).run(spec.get("inputs") or {}, dict(os.environ)))
    write_json(Path(argv[2]), {"ok": result.ok, "output": result.output, "error": result.error})
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
