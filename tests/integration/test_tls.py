"""Encrypted transport (issue 9, item 6) and a 100 MiB message (item 7), against a private RabbitMQ
whose only AMQP port for runherd is a TLS listener that demands a client certificate, and a private
PostgreSQL cluster that accepts TLS connections with a client certificate and nothing else. The
certificates are made by the test. The machine's own RabbitMQ and PostgreSQL are not touched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
import yaml

from runherd import app, config
from runherd.broker import BODY_BYTES_HEADER, ERROR_HEADER, OVERSIZED_HEAD_BYTES, Broker
from runherd.store import Store, migrate
from tests import harness, private_rabbit, tls_certs
from tests.faults.pgcluster import PgCluster, free_port

pytestmark = pytest.mark.skipif(not private_rabbit.available(), reason="no rabbitmq-server to start a private node")

MiB = 1024 * 1024


@dataclass
class Stack:
    certs: tls_certs.Certs
    rabbit: private_rabbit.PrivateRabbit
    pg: PgCluster
    tls_port: int
    tmp: Path

    def raw(self, database: str) -> dict[str, Any]:
        """runherd.yaml for this stack: TLS everywhere, through the config's own keys."""
        certs = self.certs
        return harness.fast_raw(
            f"postgresql://postgres@127.0.0.1:{self.pg.port}/{database}",
            f"amqps://guest:guest@127.0.0.1:{self.tls_port}/",
            self.tmp / "logs",
            amqp_tls={"ca_file": str(certs.ca), "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)},
            database_tls={
                "sslmode": "verify-full",
                "ca_file": str(certs.ca),
                "cert_file": str(certs.client_cert),
                "key_file": str(certs.client_key),
            },
        )


def _ssl_cluster(certs: tls_certs.Certs) -> PgCluster:
    pg = PgCluster().init()
    for source, name in ((certs.server_cert, "server.crt"), (certs.server_key, "server.key"), (certs.ca, "ca.crt")):
        target = pg.data / name
        shutil.copy(source, target)
        target.chmod(0o600)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(target, owner.pw_uid, owner.pw_gid)
    with open(pg.data / "postgresql.conf", "a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n")
    # TLS with a client certificate naming the user, or nothing (no `host` line: plain TCP is refused).
    (pg.data / "pg_hba.conf").write_text(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust clientcert=verify-full\n"
    )
    pg.start()
    return pg


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("tls")
    certs = await asyncio.to_thread(tls_certs.make, tmp / "certs")
    tls_port = free_port()
    rabbit = private_rabbit.PrivateRabbit(
        tmp / "rabbit",
        conf=(
            f"listeners.ssl.default = {tls_port}\n"
            f"ssl_options.cacertfile = {certs.ca}\n"
            f"ssl_options.certfile = {certs.server_cert}\n"
            f"ssl_options.keyfile = {certs.server_key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
        ),
    )
    pg_started = asyncio.ensure_future(asyncio.to_thread(_ssl_cluster, certs))
    try:
        await rabbit.start()
        pg = await pg_started
    except BaseException:
        await rabbit.remove()
        with contextlib.suppress(BaseException):
            (await pg_started).destroy()
        raise
    try:
        yield Stack(certs, rabbit, pg, tls_port, tmp)
    finally:
        await rabbit.remove()
        await asyncio.to_thread(pg.destroy)


async def _database(stack: Stack) -> config.Config:
    cfg = config.from_mapping(stack.raw(f"runherd_tls_{uuid.uuid4().hex[:8]}"))
    await migrate(cfg.database_url)  # over TLS, as is everything below
    return cfg


async def test_the_happy_path_runs_over_tls_only(stack: Stack) -> None:
    cfg = await _database(stack)
    assert cfg.amqp_url.startswith(f"amqps://guest:guest@127.0.0.1:{stack.tls_port}/?cafile=")
    assert "sslmode=verify-full" in cfg.database_url

    # What is refused: plain TCP to PostgreSQL, TLS without a client certificate to either server.
    database = cfg.database_url.split("?")[0]
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(f"{database}?sslmode=disable", timeout=10)
    with pytest.raises((asyncpg.InvalidAuthorizationSpecificationError, ConnectionError, OSError)):
        await asyncpg.connect(f"{database}?sslmode=verify-full&sslrootcert={stack.certs.ca}", timeout=10)
    no_cert = f"amqps://guest:guest@127.0.0.1:{stack.tls_port}/?cafile={stack.certs.ca}"
    with pytest.raises(Exception):  # noqa: B017 - the TLS handshake fails, however aiormq words it
        await aio_pika.connect(no_cert, timeout=10)

    running = await app.start(cfg, {"launcher": 1, "heartbeat": 1, "monitor": 1})
    store = await Store.connect(cfg.database_url, max_size=2)
    broker = await Broker.connect(cfg.amqp_url)
    try:
        run_id = str(uuid.uuid4())
        launch = {"v": 1, "run_id": run_id, "job": "tls", "steps": [{"key": "hello", "command": ["true"]}]}
        await broker.publish_command("launch", orjson.dumps(launch))

        async def finished() -> dict[str, Any] | None:
            run = await store.get_run(run_id)
            return run if run is not None and run["status"] in ("SUCCESS", "FAILURE") else None

        run = await harness.eventually(finished, 30, what="the run over TLS to finish")
        assert run["status"] == "SUCCESS"
        # The worker reported over TLS: the broker's only port here for it is the TLS listener.
        types = [e["type"] for e in await store.list_events(run_id)]
        assert {"RUN_START", "STEP_SUCCESS", "RUN_SUCCESS"} <= set(types)
        # Every client connection to the database is encrypted.
        rows = await store.fetch(
            "SELECT s.ssl, s.client_dn FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.datname = current_database() AND a.backend_type = 'client backend'"
        )
        assert rows and all(r["ssl"] and r["client_dn"] == "/CN=postgres" for r in rows), rows
    finally:
        await running.close(grace=5)
        await broker.close()
        await store.close()


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak resident set) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


async def test_a_100_mib_message_is_refused_without_exhausting_the_consumer(stack: Stack) -> None:
    cfg = await _database(stack)
    path = stack.tmp / f"runherd-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(stack.raw(cfg.database_url.split("?")[0].rsplit("/", 1)[1])))
    log = open(stack.tmp / "launcher.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "runherd.cli", "--config", str(path), "launcher"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=harness.ROOT,
    )
    connection = await aio_pika.connect(cfg.amqp_url, timeout=10)
    try:

        async def consuming() -> bool:
            assert launcher.poll() is None, (stack.tmp / "launcher.log").read_text()[-2000:]
            probe = await connection.channel()  # a failed passive declare closes its channel
            try:
                queue = await probe.declare_queue("runherd.launcher.commands", passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return False
            await probe.close()
            return bool(queue.declaration_result.consumer_count)

        await harness.eventually(consuming, 30, interval=0.2, what="the launcher consuming")
        channel = await connection.channel()
        before = _memory(launcher.pid)
        size = 100 * MiB
        head = b'{"v": 1, "job": "huge", "steps": [], "padding": "'
        body = head + b"x" * (size - len(head) - 2) + b'"}'
        exchange = await channel.get_exchange("runherd.commands")
        await exchange.publish(aio_pika.Message(body, message_id="huge-1"), routing_key="launch")
        del body
        dead_letters = await channel.get_queue("runherd.dead-letters")

        async def dead_letter() -> aio_pika.abc.AbstractIncomingMessage | None:
            return await dead_letters.get(fail=False, no_ack=True)

        dead = await harness.eventually(dead_letter, 60, interval=0.2, what="the dead letter of the 100 MiB launch")
        after = _memory(launcher.pid)
        assert launcher.poll() is None
    finally:
        await connection.close()
        launcher.terminate()
        await asyncio.to_thread(launcher.wait, 15)
    assert str(dead.headers[ERROR_HEADER]).startswith(f"message too large: {size} bytes, over the limit of")
    assert dead.headers[BODY_BYTES_HEADER] == size
    assert len(dead.body) == OVERSIZED_HEAD_BYTES and dead.message_id == "huge-1"
    growth = after["VmHWM"] - before["VmRSS"]
    print(f"launcher RSS before {before['VmRSS'] / MiB:.0f} MiB, peak after {after['VmHWM'] / MiB:.0f} MiB")
    assert growth < 1.5 * size, f"the launcher's memory grew by {growth / MiB:.0f} MiB for a 100 MiB message"
