"""runherd from Python: launch runs, follow their statuses, wait for them, cancel and re-execute.

Needs runherd running (`runherd up`, from this repository's root so `examples.steps` imports):

    RUNHERD_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ \\
    RUNHERD_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/runherd \\
    python examples/client_example.py

The database URL is optional: without it, ``wait()`` follows the status topic only.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from runherd.client import Client, Launch, StatusStream, Step
from runherd.config import DEFAULT_AMQP_URL
from runherd.errors import InvalidMessage

JOB = "client-example"
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {text}", flush=True)


async def print_changes(changes: StatusStream, names: dict[str, str]) -> None:
    async for change in changes:
        what = f"{change.previous_status or '-'} -> {change.status}"
        why = f"  ({change.reason})" if change.reason else ""
        say(f"status   {names.get(change.run_id, change.run_id[:8]):<9} {what:<22} attempt {change.attempt}{why}")


async def main() -> None:
    amqp_url = os.environ.get("RUNHERD_AMQP_URL", DEFAULT_AMQP_URL)
    database_url = os.environ.get("RUNHERD_DATABASE_URL")
    flag = Path(tempfile.mkdtemp(prefix="runherd-example-")) / "table-exists"
    names: dict[str, str] = {}
    async with await Client.connect(amqp_url, database_url) as client, client.statuses(job=JOB) as changes:
        printer = asyncio.create_task(print_changes(changes, names))

        # 1. A run of two steps; its id is known before anything is sent.
        hello = Launch(
            JOB,
            [
                Step("greet", command=["echo", "hello from runherd"]),
                Step("count", call="examples.steps:count_words", deps=["greet"]),
            ],
            tags={"team": "demo"},
        )
        names[hello.run_id] = "hello"
        await client.launch(hello)
        say(f"launched hello     {hello.run_id}")
        say(f"waited   hello     {await client.wait(hello.run_id, timeout=60)}")

        # 2. A mistake is refused here, with the sentence the service would dead-letter it with.
        try:
            await client.launch(JOB, [Step("oops", command=["true"], call="examples.steps:report")])
        except InvalidMessage as exc:
            say(f"refused  locally   {exc}")

        # 3. A failing run gives its reason; fixed, it is re-executed from the failure.
        steps = [
            Step("extract", command=["echo", "extracted"]),
            Step(
                "load",
                command=["sh", "-c", f"test -e {flag} || {{ echo 'no such table' >&2; exit 3; }}"],
                deps=["extract"],
            ),
        ]
        failing = await client.launch(JOB, steps)
        names[failing] = "failing"
        say(f"waited   failing   {await client.wait(failing, timeout=60)}")
        flag.touch()
        retry = await client.reexecute(failing, strategy="FROM_FAILURE")
        names[retry] = "retry"
        say(f"waited   retry     {await client.wait(retry, timeout=60)}")

        # 4. A worker that dies mid-step (it SIGKILLs its own worker on attempt 1) is resumed.
        crashing = await client.launch(
            JOB, [Step("fragile", command=["sh", "-c", 'if [ "$RUNHERD_ATTEMPT" = 1 ]; then kill -9 $PPID; fi'])]
        )
        names[crashing] = "crashing"
        say(f"waited   crashing  {await client.wait(crashing, timeout=60)}")

        # 5. A long run, canceled.
        async with client.statuses(job=JOB, status="STARTED") as started:  # subscribed before the launch
            slow = await client.launch(JOB, [Step("sleep", command=["sleep", "600"])])
            names[slow] = "slow"
            async for change in started:
                if change.run_id == slow:
                    break
        await client.cancel(slow)
        say(f"waited   slow      {await client.wait(slow, timeout=60)}")

        await asyncio.sleep(0.5)  # the last status messages are on their way to the printer
        printer.cancel()


if __name__ == "__main__":
    asyncio.run(main())
