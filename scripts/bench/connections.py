"""What a live worker costs RabbitMQ: memory and file descriptors per connection, and per channel
when workers share a connection (the sim launcher's ``workers_per_connection``).

A private RabbitMQ node (tests/private_rabbit.py: its own ports and data, nothing else on it) is
measured with ``rabbitmqctl status`` before and after opening K worker-like connections (each a
robust connection, a channel with publisher confirms, one heartbeat published, as ``runherd worker``
does), then K workers as channels over K / 50 shared connections. The machine's own broker is only
read, for its socket limit.

    .venv/bin/python scripts/bench/connections.py [-k 300]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from runherd.broker import Broker  # noqa: E402
from runherd.contract import heartbeat_body  # noqa: E402
from scripts.bench._benchlib import machine, table  # noqa: E402
from tests.private_rabbit import PrivateRabbit  # noqa: E402

MB = 1024 * 1024
CONNECTION_KEYS = ("connection_readers", "connection_writers", "connection_channels", "connection_other")


def status(node: PrivateRabbit | None) -> dict[str, Any]:
    args = ["rabbitmqctl", "-q", "status", "--formatter", "json"]
    env = None
    if node is not None:
        cookie = (node.base / ".erlang.cookie").read_text().strip()
        args[1:1] = ["-n", node.name, "--erlang-cookie", cookie]
        env = node._environ()
    done = subprocess.run(args, capture_output=True, timeout=60, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl status failed: {done.stderr.decode()[-800:]}")
    out = done.stdout
    return dict(json.loads(out))


def figures(data: dict[str, Any]) -> dict[str, float]:
    memory = data["memory"]
    total = memory["total"]
    return {
        "total": float(total["erlang"] if isinstance(total, dict) else total),
        "rss": float(total.get("rss", 0) if isinstance(total, dict) else 0),
        "connections": float(sum(memory.get(k, 0) for k in CONNECTION_KEYS)),
        "fds": float(data["file_descriptors"]["total_used"]),
        "sockets": float(data["file_descriptors"]["sockets_used"]),
    }


async def settle(node: PrivateRabbit) -> dict[str, float]:
    await asyncio.sleep(3)  # let the node's memory counters catch up
    return figures(await asyncio.to_thread(status, node))


async def one_per_worker(url: str, k: int) -> list[Broker]:
    brokers = []
    for start in range(0, k, 50):
        brokers += await asyncio.gather(*(Broker.connect(url, declare=False) for _ in range(min(50, k - start))))
    for b in brokers:
        await b.publish_heartbeat(heartbeat_body("00000000-0000-0000-0000-000000000001", 1))
    return brokers


async def shared(url: str, k: int, per: int) -> tuple[list[Broker], list[Broker]]:
    bases = [await Broker.connect(url, declare=False) for _ in range((k + per - 1) // per)]
    workers = []
    for i in range(k):
        worker = await bases[i // per].sibling()
        await worker.publish_heartbeat(heartbeat_body("00000000-0000-0000-0000-000000000001", 1))
        workers.append(worker)
    return bases, workers


def row(name: str, k: int, before: dict[str, float], after: dict[str, float], connections: int) -> list[Any]:
    return [
        name,
        k,
        connections,
        f"{(after['rss'] - before['rss']) / k / 1024:.0f} KiB",
        f"{(after['connections'] - before['connections']) / k / 1024:.0f} KiB",
        f"{(after['total'] - before['total']) / k / 1024:.0f} KiB",
        f"{(after['fds'] - before['fds']) / k:.2f}",
        f"{(after['rss'] - before['rss']) / k * 1000 / MB:.0f} MiB",
    ]


async def run(k: int, per: int) -> None:
    print(f"# connections: {k} workers\n\n{machine()}")
    main = figures(await asyncio.to_thread(status, None))
    limits = (await asyncio.to_thread(status, None))["file_descriptors"]
    print(
        f"\nThe machine's broker: {limits['sockets_limit']} sockets allowed "
        f"({main['sockets']:.0f} in use), {limits['total_limit']} file descriptors."
    )
    with tempfile.TemporaryDirectory(prefix="runherd-bench-conn-") as tmp:
        node = PrivateRabbit(Path(tmp) / "rabbit")
        await node.start()
        try:
            topology = await Broker.connect(node.url)  # declares the public topology once
            base = await settle(node)
            began = time.perf_counter()
            brokers = await one_per_worker(node.url, k)
            opened = time.perf_counter() - began
            each = await settle(node)
            for b in brokers:
                await b.close()
            base2 = await settle(node)
            bases, workers = await shared(node.url, k, per)
            pooled = await settle(node)
            for w in workers:
                await w.close_channel()
            for b in bases:
                await b.close()
            await topology.close()
        finally:
            await node.remove()
    for name, snap in (("idle", base), (f"{k} connections", each), ("idle again", base2), ("shared", pooled)):
        print(
            f"{name}: erlang {snap['total'] / MB:.0f} MiB, rss {snap['rss'] / MB:.0f} MiB, "
            f"connection procs {snap['connections'] / MB:.1f} MiB, fds {snap['fds']:.0f}"
        )
    headers = [
        "workers as",
        "workers",
        "connections",
        "broker RSS / worker",
        "connection processes / worker",
        "Erlang-allocated / worker",
        "fds / worker",
        "RSS per 1,000 workers",
    ]
    print(f"\n## The broker's cost per live worker (private node; {k} opened in {opened:.1f} s)\n")
    print(
        table(
            headers,
            [
                row("a connection each (as `runherd worker`)", k, base, each, k),
                row(f"a channel each, {per} per connection", k, base2, pooled, len(bases)),
            ],
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", type=int, default=300, help="workers (the machine's broker takes ~830 sockets)")
    parser.add_argument("--per", type=int, default=50, help="workers per shared connection")
    args = parser.parse_args()
    asyncio.run(run(args.k, args.per))
    return 0


if __name__ == "__main__":
    sys.exit(main())
