"""A TCP proxy a test can cut, to break the services' connection to RabbitMQ or PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._pipes: set[asyncio.StreamWriter] = set()
        self.cuts = 0
        self.refused = 0  # connections turned away while refusing
        self._refuse_until = 0.0

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def refusing(self) -> bool:
        return asyncio.get_running_loop().time() < self._refuse_until

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            # The listening socket stays open (its port must not be taken by anyone else); a client
            # sees its connection reset at once, as it would against a broker that is down.
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._pipes.update({writer, up_writer})
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer), return_exceptions=True)
        self._pipes.difference_update({writer, up_writer})

    def cut(self, refuse_for: float = 0.0) -> None:
        """Drop every open connection; new ones are refused for ``refuse_for`` seconds (then
        accepted again)."""
        self.cuts += 1
        if refuse_for > 0:
            self._refuse_until = asyncio.get_running_loop().time() + refuse_for
        for writer in list(self._pipes):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._pipes.clear()

    def accept(self) -> None:
        """Stop refusing new connections now (ends a ``cut(refuse_for=...)`` early)."""
        self._refuse_until = 0.0

    @property
    def open_connections(self) -> int:
        return len(self._pipes) // 2

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()
