"""Screenshots of `runherd ui` for the README: docs/ui-runs.png (the run list) and
docs/ui-run-timeline.png (a run whose worker was SIGKILLed mid-step and resumed).

Real services, workers and UI on a private database and vhost (removed afterwards), photographed by
Debian's headless Chromium through Selenium:

    .venv/bin/python scripts/ui_screenshots.py [--out docs]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402

from runherd import app, config  # noqa: E402
from runherd.broker import Broker  # noqa: E402
from runherd.store import Store  # noqa: E402
from runherd.ui import server  # noqa: E402
from scripts.bench._benchlib import bench_env  # noqa: E402


def sleep_step(key: str, seconds: float, deps: list[str] | None = None) -> dict[str, Any]:
    return {
        "key": key,
        "command": ["sh", "-c", f"echo {key} working; sleep {seconds}; echo {key} done"],
        "deps": deps or [],
    }


async def wait(store: Store, run_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await store.get_run(run_id)
        if run is not None and run["status"] in statuses:
            return run
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{run_id} not in {statuses}")


async def launch(broker: Broker, job: str, steps: list[dict[str, Any]], tags: dict[str, Any] | None = None) -> str:
    run_id = str(uuid.uuid4())
    body = {"v": 1, "run_id": run_id, "job": job, "steps": steps, "tags": tags or {}}
    await broker.publish_command("launch", orjson.dumps(body))
    return run_id


async def main(out: Path, extra: bool) -> None:
    async with bench_env("shots") as env:
        cfg = config.from_mapping(
            {
                "amqp_url": env.amqp_url,
                "database_url": env.db_url,
                "run_monitoring": {"poll_interval_seconds": 0.5, "heartbeat_interval_seconds": 0.5},
                "run_coordinator": {
                    "dequeue_interval_seconds": 0.2,
                    "tag_concurrency_limits": [{"key": "warehouse", "value": "snowflake", "limit": 1}],
                },
                "run_retries": {"max_retries": 1},
                "run_launcher": {"name": "process", "config": {"log_dir": str(env.tmp / "logs")}},
            }
        )
        running = await app.start(cfg, {"launcher": 1, "heartbeat": 1, "monitor": 1})
        store = await Store.connect(env.db_url)
        broker = await Broker.connect(env.amqp_url)
        ui = await server.start(cfg, host="127.0.0.1", port=0)
        try:
            for i in range(6):
                await launch(
                    broker,
                    "hourly-sync",
                    [sleep_step("pull", 0.2), sleep_step("push", 0.2, ["pull"])],
                    {"team": "data", "shard": str(i)},
                )
            report = await launch(
                broker,
                "billing-report",
                [
                    {
                        "key": "query",
                        "command": ["sh", "-c", "echo 'ERROR: relation invoices does not exist' >&2; exit 3"],
                    }
                ],
                {"team": "finance"},
            )
            gate = env.tmp / "transform-started"
            etl = await launch(
                broker,
                "nightly-etl",
                [
                    sleep_step("extract", 1.2),
                    {
                        "key": "transform",
                        "command": [
                            "sh",
                            "-c",
                            "echo transforming 1.2M rows; "
                            f'if [ "$RUNHERD_ATTEMPT" = 1 ]; then touch {gate}; sleep 600; '
                            "else sleep 1.4; fi; echo transform done",
                        ],
                        "deps": ["extract"],
                    },
                    sleep_step("load", 0.8, ["transform"]),
                    sleep_step("notify", 0.3, ["load"]),
                ],
                {"team": "data", "runherd/max_retries": 0},
            )
            for _ in range(600):
                if gate.exists():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            rows = await store.fetch("SELECT handle FROM attempts WHERE run_id = $1 AND attempt = 1", uuid.UUID(etl))
            os.kill(rows[0]["handle"]["pid"], signal.SIGKILL)
            blocker = await launch(broker, "warehouse-vacuum", [sleep_step("vacuum", 600)], {"warehouse": "snowflake"})
            await wait(store, blocker, "STARTED")
            for job in ("dashboard-refresh", "ml-features"):
                await launch(broker, job, [sleep_step("build", 1)], {"warehouse": "snowflake", "team": "analytics"})
            canceled = await launch(broker, "backfill-2019", [sleep_step("backfill", 600)], {"team": "data"})
            await wait(store, canceled, "STARTED")
            await broker.publish_command("terminate", orjson.dumps({"v": 1, "run_id": canceled}))
            await broker.publish_command("launch", b'{"v": 1, "job": "broken", "steps": []}')
            await wait(store, etl, "SUCCESS", "FAILURE")
            await wait(store, report, "FAILURE")
            await asyncio.sleep(1.5)
            await asyncio.to_thread(shoot, ui.url, etl, out, extra)
        finally:
            await ui.close()
            await running.close(grace=2)
            await broker.close()
            await store.close()


def shoot(url: str, etl: str, out: Path, extra: bool) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1440,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        out.mkdir(parents=True, exist_ok=True)
        driver.get(url + "/")
        time.sleep(0.5)
        driver.save_screenshot(str(out / "ui-runs.png"))
        driver.set_window_size(1440, 1180)
        driver.get(f"{url}/runs/{etl}")
        time.sleep(0.5)
        driver.save_screenshot(str(out / "ui-run-timeline.png"))
        print(f"wrote {out / 'ui-runs.png'} and {out / 'ui-run-timeline.png'}")
        if extra:
            for page in ("queue", "fleet"):
                driver.get(f"{url}/{page}")
                time.sleep(0.5)
                driver.save_screenshot(str(out / f"ui-{page}.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs", type=Path)
    parser.add_argument("--all", action="store_true", help="the queue and fleet pages too")
    args = parser.parse_args()
    asyncio.run(main(args.out, args.all))
