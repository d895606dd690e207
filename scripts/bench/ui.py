"""How fast `runherd ui` renders the run list with 100,000 runs in the database.

Seeds N runs (default 100,000: 20 jobs, four teams, a few `gpu` runs, statuses as a busy fleet has
them, created over 30 days), starts the UI in this process, and times whole HTTP requests of the run
list (query, counts per status, template, response) for the first page, each kind of filter and a
page deep in the keyset. Raw ceiling in the same run: the bare page query alone (asyncpg, the same
SQL), and the counts query alone.

    .venv/bin/python scripts/bench/ui.py [--runs 100000] [--requests 100]
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
from urllib.parse import urlencode  # noqa: E402

import aiohttp  # noqa: E402

from runherd import config  # noqa: E402
from runherd.broker import Broker  # noqa: E402
from runherd.store import Store  # noqa: E402
from runherd.store import ui as reads  # noqa: E402
from runherd.ui import model, server  # noqa: E402
from scripts.bench._benchlib import bench_env, machine, ms, pct, ratio, table  # noqa: E402

SEED = """
INSERT INTO runs (run_id, job, status, attempt, priority, tags, steps, root_run_id, created_at, started_at, ended_at,
                  status_changed_at, reason)
SELECT id, 'job-' || (i % 20),
       CASE WHEN i % 100 < 90 THEN 'SUCCESS' WHEN i % 100 < 96 THEN 'FAILURE' WHEN i % 100 < 98 THEN 'CANCELED'
            WHEN i % 100 < 99 THEN 'STARTED' ELSE 'QUEUED' END,
       1, 0,
       jsonb_build_object('team', (ARRAY['data', 'web', 'ml', 'finance'])[1 + i % 4])
           || CASE WHEN i % 97 = 0 THEN '{"gpu": "a100"}'::jsonb ELSE '{}'::jsonb END,
       '[{"key": "a", "command": ["true"], "deps": []}]'::jsonb, id, t, t + interval '1 second',
       t + interval '30 seconds', t + interval '30 seconds',
       CASE WHEN i % 100 BETWEEN 90 AND 95 THEN 'step failed: a (exited with code 1)' END
FROM (SELECT i, gen_random_uuid() AS id,
             now() - make_interval(secs => ($1::float8 - i) * 2592000.0 / $1::float8) AS t
      FROM generate_series(1, $1::integer) AS i) s
"""


async def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(5):
        await fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def main(runs: int, requests: int) -> None:
    print(machine())
    async with bench_env("ui") as env:
        cfg = config.from_mapping({"amqp_url": env.amqp_url, "database_url": env.db_url})
        broker = await Broker.connect(env.amqp_url)  # declares runherd.status for the UI's live feed
        store = await Store.connect(env.db_url)
        t = time.perf_counter()
        await store.pool.execute(SEED, runs)
        await store.pool.execute("VACUUM ANALYZE runs")
        print(f"seeded {runs:,} runs in {time.perf_counter() - t:.1f} s")
        deep = (
            await store.fetch(
                "SELECT created_at, run_id FROM runs ORDER BY created_at DESC, run_id DESC OFFSET $1 LIMIT 1", runs // 2
            )
        )[0]
        cursor = model.encode_cursor(deep)
        ui = await server.start(cfg, host="127.0.0.1", port=0)
        scenarios = {
            "first page, no filter": {},
            "status=FAILURE": {"status": "FAILURE"},
            "job=job-7": {"job": "job-7"},
            "tag team=finance": {"tag": "team=finance"},
            "tag gpu + CANCELED (rare)": {"tag": "gpu", "status": "CANCELED"},
            "last 24h, SUCCESS": {"within": "24h", "status": "SUCCESS"},
            f"page at run {runs // 2:,} (keyset)": {"after": cursor},
        }
        rows = []
        try:
            async with aiohttp.ClientSession() as http:
                for name, params in scenarios.items():
                    url = f"{ui.url}/?{urlencode(params)}"

                    async def get(url: str = url) -> None:
                        async with http.get(url) as response:
                            assert response.status == 200, response.status
                            await response.read()

                    page = await timed(get, requests)
                    query = model.parse_list_query(params, _now())
                    sql, args = reads.page_sql(query.filter, query.limit + 1, query.older_than)

                    async def bare(sql: str = sql, args: list = args) -> None:  # type: ignore[type-arg]
                        await store.pool.fetch(sql, *args)

                    async def counts(f: reads.RunFilter = query.filter) -> None:
                        await reads.status_counts(store, f)

                    raw = await timed(bare, requests)
                    count = await timed(counts, requests)
                    rows.append(
                        [
                            name,
                            ms(pct(page, 50)),
                            ms(pct(page, 99)),
                            ms(pct(raw, 50)),
                            ms(pct(count, 50)),
                            ratio(pct(page, 50), pct(raw, 50)),
                        ]
                    )
        finally:
            await ui.close()
            await store.close()
            await broker.close()
        print(
            table(
                ["run list request", "p50", "p99", "bare page query p50", "counts query p50", "p50 / bare query"],
                rows,
            )
        )


def _now():  # type: ignore[no-untyped-def]
    from runherd.ui.data import now

    return now()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.requests))
