"""`python -m runherd.worker.detached SPEC RESULT`: one try of a step under the ``launcher``
executor, as the leader of its own process group that outlives the worker.

SPEC holds the step and its inputs (JSON, gzip-compressed or not); the try runs as
runherd.worker.steps runs any step (its timeout included), and what it came to is written to RESULT
before this process exits, for the worker that started it or the resumed attempt that adopted it.
RESULT ``-`` prints it instead, as the last line of stdout after ``RUNHERD_STEP_RESULT `` (a step Job
on Kubernetes: its pod's log is read back).

An orphan does not run forever: when no worker of its run has been alive for
``RUNHERD_STEP_ORPHAN_GRACE_SECONDS`` (default 60; a resumed attempt adopts it well before), the run
will not come back for it (failed with no resume left, say): it stops its step and exits without a
result.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from runherd import step_groups
from runherd.contract import parse_step
from runherd.launchers.process import RECORD_ENV
from runherd.worker.steps import StepProcess, StepResult

EXIT_ORPHANED = 4
RESULT_MARKER = "RUNHERD_STEP_RESULT "  # runherd.launchers.kubernetes.steps reads it back


async def _watch_orphan(folder: Path, grace: float) -> None:
    since: float | None = None
    while True:
        now = time.monotonic()
        since = step_groups.orphaned_for(since, step_groups.workers_alive(folder), now)
        if since is not None and now - since >= grace:
            return
        await asyncio.sleep(min(0.5, grace / 4))


async def run(spec: dict[str, Any], result_path: Path) -> int:
    step = parse_step(spec["step"], 0)
    process = StepProcess(step)
    inputs = spec.get("inputs")
    work = asyncio.ensure_future(process.run(inputs if isinstance(inputs, dict) else {}, dict(os.environ)))
    grace = float(os.environ.get(step_groups.ORPHAN_GRACE_ENV) or step_groups.ORPHAN_GRACE_SECONDS)
    waiters: set[asyncio.Future[Any]] = {work}
    if os.environ.get(RECORD_ENV):  # under the process launcher, whose worker records say who is alive
        waiters.add(asyncio.ensure_future(_watch_orphan(result_path.parent, grace)))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        print(f"no worker of the run for {grace:g} s: the step is an orphan, stopping it", file=sys.stderr)
        await process.stop(grace=3)
        work.cancel()
        return EXIT_ORPHANED
    result: StepResult = work.result()
    got = {"ok": result.ok, "output": result.output, "error": result.error}
    if str(result_path) == "-":
        sys.stderr.flush()
        sys.stdout.write(RESULT_MARKER + orjson.dumps(got).decode() + "\n")
        sys.stdout.flush()
    else:
        step_groups.write_json(result_path, got)
    return 0 if result.ok else 1


def main(argv: list[str]) -> int:
    data = Path(argv[1]).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return asyncio.run(run(orjson.loads(data), Path(argv[2])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
