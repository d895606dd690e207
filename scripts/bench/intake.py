"""Launch intake: N launch commands published at once, until every run is stored QUEUED.

The launcher service alone runs (in-process, the sim launcher, ``max_concurrent_runs: 0`` so nothing is
dequeued: what is measured is the intake), against a private database and vhost. It takes commands in
batches of up to 500 and stores each batch's launches with one statement. Raw ceiling, in the same run:
the same bodies published the same way to a quorum queue, consumed 500 at a time, one INSERT per batch.

    .venv/bin/python scripts/bench/intake.py [-n 10000]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import asyncpg  # noqa: E402
import orjson  # noqa: E402

from runherd import app, config  # noqa: E402
from runherd.broker import Broker  # noqa: E402
from scripts.bench._benchlib import bench_env, machine, quiet_logs, table  # noqa: E402
from scripts.bench.fleet import STEPS, raw_ceiling  # noqa: E402


async def run(n: int) -> None:
    quiet_logs()
    print(f"# intake: {n:,} launches\n\n{machine()}")
    async with bench_env("intake") as env:
        pool = await asyncpg.create_pool(env.db_url, min_size=1, max_size=2)
        raw = await raw_ceiling(env, pool, n)
        cfg = config.from_mapping(
            {
                "amqp_url": env.amqp_url,
                "database_url": env.db_url,
                "run_coordinator": {"max_concurrent_runs": 0},
                "run_launcher": {"name": "sim", "config": {}},
            }
        )
        broker = await Broker.connect(env.amqp_url)
        running = await app.start(cfg, {"launcher": 1})
        try:
            bodies = [
                orjson.dumps({"v": 1, "run_id": str(uuid.uuid4()), "job": "intake", "steps": STEPS}) for _ in range(n)
            ]
            began = time.time()
            for start in range(0, n, 1000):
                await asyncio.gather(*(broker.publish_command("launch", b) for b in bodies[start : start + 1000]))
            published = time.time()
            while await pool.fetchval("SELECT count(*) FROM runs WHERE status = 'QUEUED'") < n:
                await asyncio.sleep(0.02)
            stored = time.time()
        finally:
            await running.close(grace=2)
            await broker.close()
            await pool.close()
    rate = n / (stored - began)
    print(
        "\n"
        + table(
            ["published in", "all stored QUEUED", "after the last publish", "intake", "raw ceiling", "ratio"],
            [
                [
                    f"{published - began:.1f} s",
                    f"{stored - began:.1f} s",
                    f"{stored - published:.2f} s",
                    f"{rate:,.0f}/s",
                    f"{raw:,.0f}/s",
                    f"{rate / raw:.2f}x",
                ]
            ],
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=10_000)
    asyncio.run(run(parser.parse_args().n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
