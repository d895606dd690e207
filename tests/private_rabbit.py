"""A private RabbitMQ node that a test owns and may restart: its own node name, ports, data and log
folders, and no plugins. The machine's own node (rabbit@localhost, port 5672) is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import aio_pika

from tests.harness import eventually, group_members

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def available() -> bool:
    return os.path.exists(SERVER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRabbit:
    def __init__(self, base: Path, conf: str = "", *, management: bool = False) -> None:
        self.base = base
        self.conf = conf  # more rabbitmq.conf lines (a TLS listener, say)
        # management: the management API on its own free port (``management_url``), stats every 0.5 s
        self.management = management
        self.management_port = _free_port() if management else 0
        self.name = f"runherd-{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port()
        self.dist_port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.base),  # its Erlang cookie lives here, not in the user's home
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
        }

    async def start(self, timeout: float = 90) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # No plugins unless asked: no management listener to clash on.
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n" if self.management else "[].\n")
        conf = "loopback_users = none\n" + self.conf
        if self.management:
            conf += (
                f"management.tcp.port = {self.management_port}\nmanagement.tcp.ip = 127.0.0.1\n"
                "collect_statistics_interval = 500\n"
            )
        (self.base / "rabbitmq.conf").write_text(conf)
        (self.base / "rabbitmq-env.conf").write_text("")
        log = open(self.base / f"server-{self.starts}.log", "wb")
        self.process = subprocess.Popen(
            [SERVER], env=self._environ(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.starts += 1
        await eventually(self._accepts, timeout, interval=0.25, what=f"private RabbitMQ {self.name} up")

    async def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"private RabbitMQ exited: see {self.base}/server-*.log")
        try:
            connection = await aio_pika.connect(self.url, timeout=2)
        except Exception:
            return False
        await connection.close()
        return True

    async def stop(self, timeout: float = 60) -> None:
        """A clean shutdown (SIGTERM to the Erlang VM), as a service restart does."""
        if self.process is None:
            return
        group = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            # The whole group, the Erlang VM included, not only the script we started.
            await eventually(lambda: not _group_alive(group), timeout, interval=0.1, what="private RabbitMQ stopped")
        except AssertionError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)
        self.process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def remove(self) -> None:
        await self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    async def discard(self) -> None:
        """SIGKILL the node (the group we started) and remove its files: for a node no test will
        restart, where a clean shutdown only costs seconds."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await asyncio.to_thread(self.process.wait, 10)
            self.process = None
        shutil.rmtree(self.base, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies (the script, reaped only by wait()) count as gone.
    return bool(group_members(pgid))
