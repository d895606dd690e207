"""/healthz and /readyz of a real `runherd up` process: ready once connected and consuming, not
ready while its RabbitMQ connection is cut (through a TCP proxy), ready again after."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import aiohttp
import yaml

from tests.harness import ROOT, Env, eventually
from tests.proxy import Proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, str]:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


def compose_healthcheck(port: int) -> list[str]:
    """compose.yaml's healthcheck command, run here with this interpreter against ``port``."""
    runherd = yaml.safe_load((ROOT / "compose.yaml").read_text())["x-runherd"]
    assert runherd["environment"]["RUNHERD_METRICS_PORT"] == "9400"
    kind, python, *args = runherd["healthcheck"]["test"]
    assert (kind, python) == ("CMD", "python")
    return [sys.executable, *(a.replace(":9400/", f":{port}/") for a in args)]


async def healthy(command: list[str]) -> bool:
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=10)
    return done.returncode == 0


async def test_readyz_follows_the_broker_connection(env: Env) -> None:
    amqp = urlsplit(env.amqp_url)
    proxy = await Proxy(amqp.hostname or "127.0.0.1", amqp.port or 5672).start()
    port = free_port()
    proxied = env.amqp_url.replace(f":{amqp.port}/", f":{proxy.port}/")
    env.amqp_url = proxied  # what the spawned service is configured with
    env.configure(metrics_port=port)
    proc = env.spawn("up")
    try:

        async def answer(path: str, status: int) -> tuple[int, str] | None:
            assert proc.poll() is None, "runherd up exited"
            got = await get(port, path)
            return got if got[0] == status else None

        await eventually(lambda: answer("/readyz", 200), 20, 0.1, "ready")
        assert (await get(port, "/healthz"))[0] == 200
        status, metrics = await get(port, "/metrics")
        assert status == 200
        assert 'runherd_service_replicas{service="monitor"} 1.0' in metrics
        check = compose_healthcheck(port)
        assert await healthy(check), "compose's healthcheck passes on a ready service"

        proxy.cut(refuse_for=60)  # every service's connection drops; reconnects refused until accept()
        status, body = await eventually(lambda: answer("/readyz", 503), 5, 0.05, "not ready after the cut")
        assert "not connected to RabbitMQ" in body or "not consuming" in body, body
        assert (await get(port, "/healthz"))[0] == 200, "the process is alive all along"
        assert not await healthy(check), "compose's healthcheck fails while not ready"
        assert (await get(port, "/readyz"))[0] == 503, "still cut"
        # The services keep trying while cut: a reconnect is refused before the broker comes back.
        await eventually(lambda: proxy.refused > 0, 20, 0.1, "a reconnect attempt while cut")
        proxy.accept()

        await eventually(lambda: answer("/readyz", 200), 20, 0.1, "ready again after the cut")
        assert (await get(port, "/nope"))[0] == 404
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)
        await proxy.close()
