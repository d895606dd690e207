"""SIGTERM: stop consuming, finish the batches in hand, flush the status outbox, exit 0 within a
bounded time; afterwards nothing is applied or published twice and nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

from tests.harness import Env, eventually, status_log

SHUTDOWN_BOUND_SECONDS = 20  # the supervisor's grace (10 s) plus the outbox flush (5 s) and margin


async def test_sigterm_exits_0_promptly_and_nothing_is_lost_or_doubled(env: Env) -> None:
    async with status_log(env.amqp_url) as statuses:
        up = env.spawn("up")
        steps = [
            {"key": "a", "command": ["sh", "-c", "sleep 0.5"]},
            {"key": "b", "command": ["sh", "-c", "sleep 1.5"], "deps": ["a"]},
        ]
        run_ids = [await env.submit(steps, job="graceful") for _ in range(20)]

        async def some_started() -> bool:
            rows = await env.store.fetch("SELECT count(*) AS n FROM runs WHERE status = 'STARTED'")
            return rows[0]["n"] >= 5

        await eventually(some_started, timeout=40, what="5 runs started")
        began = time.monotonic()
        up.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(up.wait, SHUTDOWN_BOUND_SECONDS)
        took = time.monotonic() - began
        assert code == 0, f"runherd up exited {code} on SIGTERM"
        assert took < SHUTDOWN_BOUND_SECONDS
        print(f"SIGTERM to exit: {took:.2f} s")

        await env.start()  # the next deployment: adopts live workers, takes the queued rest
        for run_id in run_ids:
            run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=60)
            assert run["status"] == "SUCCESS", run["reason"]

        async def all_published() -> bool:
            return all(statuses.of(r)[-1:] == ["SUCCESS"] for r in run_ids)

        await eventually(all_published, timeout=20, what="every SUCCESS published")
    for run_id in run_ids:
        published = statuses.of(run_id)
        doubled = [s for s, n in Counter(published).items() if n > 1]
        assert not doubled, f"{run_id} published {doubled} twice: {published}"
        events = await env.events(run_id)
        kinds = Counter((e["attempt"], e["type"]) for e in events if e["type"] in ("RUN_START", "RUN_SUCCESS"))
        assert all(n == 1 for n in kinds.values()), kinds
    assert (await env.broker.queue_depths()).get("runherd.dead-letters") == 0
