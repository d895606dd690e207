"""Connections are cut under the services (a TCP proxy in front of RabbitMQ): nothing is lost."""

from __future__ import annotations

import asyncio
import subprocess

from runherd import config
from tests.harness import Env, eventually
from tests.proxy import Proxy


async def test_broker_connection_cut_mid_run_loses_nothing(env: Env) -> None:
    """A network failure between every process (services and workers) and RabbitMQ, mid-run."""
    proxy = await Proxy("127.0.0.1", 5672).start()
    try:
        vhost = env.amqp_url.rsplit("/", 1)[1]
        cfg = config.from_mapping(
            {**env.raw_config(), "amqp_url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"}
        )

        async def cut() -> None:
            proxy.cut()

        await _runs_through_a_break(env, cfg, cut)
    finally:
        await proxy.close()


async def _runs_through_a_break(env: Env, cfg: config.Config, break_it) -> None:  # type: ignore[no-untyped-def]
    await env.start(cfg=cfg)
    gate = env.tmp / "gate"
    steps = [
        {"key": "one", "command": ["true"]},
        {"key": "two", "command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done"], "deps": ["one"]},
        {"key": "three", "command": ["true"], "deps": ["two"]},
    ]
    run_ids = [await env.submit(steps) for _ in range(3)]

    async def all_waiting() -> bool:
        events = [await env.events(r) for r in run_ids]
        return all(any(e["type"] == "STEP_START" and e["step_key"] == "two" for e in ev) for ev in events)

    await eventually(all_waiting, timeout=30, what="every run in step two")
    await break_it()
    gate.touch()
    for run_id in run_ids:
        run = await env.wait_status(run_id, "SUCCESS", "FAILURE", timeout=60)
        assert run["status"] == "SUCCESS", run["reason"]
        assert run["attempt"] == 1
        steps_done = {s["step_key"]: s["status"] for s in run["steps_status"]}
        assert steps_done == {"one": "SUCCESS", "two": "SUCCESS", "three": "SUCCESS"}
    later = await env.submit(steps[:1])
    await env.wait_status(later, "SUCCESS", timeout=30)


async def test_broker_closes_every_connection_mid_run(env: Env) -> None:
    """As when RabbitMQ restarts: the broker itself closes the services' and workers' connections."""
    vhost = env.amqp_url.rsplit("/", 1)[1]

    async def close_all() -> None:
        await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test: broker restart"],
            check=True,
            timeout=60,
        )

    await _runs_through_a_break(env, env.cfg, close_all)


async def test_database_connections_cut_mid_run(env: Env) -> None:
    proxy = await Proxy("127.0.0.1", 5432).start()
    try:
        db_name = env.db_url.rsplit("/", 1)[1]
        cfg = config.from_mapping(
            {**env.raw_config(), "database_url": f"postgresql://postgres@127.0.0.1:{proxy.port}/{db_name}"}
        )

        async def cut() -> None:
            proxy.cut()

        await _runs_through_a_break(env, cfg, cut)
    finally:
        await proxy.close()
