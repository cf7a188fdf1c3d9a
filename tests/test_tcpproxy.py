"""The fault-injecting TCP proxy itself: forwarding, cut/restore and pause/resume."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import aio_pika
import pytest

from tests.conftest import AMQP_URL
from tests.support.tcpproxy import TcpProxy

BROKER = urlsplit(AMQP_URL)


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `condition` until it holds; fail after timeout_s.

    For states nothing signals (a connection noticed gone, a socket closed by the peer).
    """
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - deadline-bounded poll, nothing to wait on
            await asyncio.sleep(0.01)


class EchoServer:
    """Echoes every byte back; tracks its handlers so the test leaves nothing running."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.handlers.discard(task)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    echo = EchoServer()
    port = await echo.start()
    try:
        yield port
    finally:
        await echo.close()


@pytest.fixture
async def proxy(echo_port: int) -> AsyncIterator[TcpProxy]:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        yield proxy


class Client:
    """A plain TCP client of the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def roundtrip(self, data: bytes) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(data)), 5)

    async def closed_by_peer(self) -> bool:
        """True once the peer closed: EOF or a reset."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), 5)
        except ConnectionError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def test_forwards_bytes_both_ways(proxy: TcpProxy) -> None:
    client = await Client.connect(proxy.port)
    try:
        assert await client.roundtrip(b"hello") == b"hello"
        assert proxy.connections == 1
        # More than the socket buffers hold: exercises back-pressure across the proxy.
        big = bytes(range(256)) * 8192
        assert await client.roundtrip(big) == big
    finally:
        await client.close()
    await eventually(lambda: proxy.connections == 0)


async def test_cut_closes_live_connections_and_refuses_new_until_restore(proxy: TcpProxy) -> None:
    first = await Client.connect(proxy.port)
    second = await Client.connect(proxy.port)
    try:
        assert await first.roundtrip(b"a") == b"a"
        assert await second.roundtrip(b"b") == b"b"
        assert proxy.connections == 2

        await proxy.cut()

        assert proxy.connections == 0
        assert await first.closed_by_peer()
        assert await second.closed_by_peer()
        refused = await Client.connect(proxy.port)  # the TCP accept still happens...
        try:
            assert await refused.closed_by_peer()  # ...then the connection drops at once
        finally:
            await refused.close()
        assert proxy.connections == 0
    finally:
        await first.close()
        await second.close()

    await proxy.restore()
    third = await Client.connect(proxy.port)
    try:
        assert await third.roundtrip(b"back") == b"back"
        assert proxy.connections == 1
    finally:
        await third.close()


async def test_pause_holds_bytes_and_resume_delivers_them(proxy: TcpProxy) -> None:
    client = await Client.connect(proxy.port)
    try:
        assert await client.roundtrip(b"warm") == b"warm"
        proxy.pause()
        client.writer.write(b"ping")
        await client.writer.drain()
        # Absence of data can only be shown by waiting a little.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.reader.read(4), 0.3)
        assert proxy.connections == 1  # paused, not closed

        # A connection opened while paused is held too.
        late = await Client.connect(proxy.port)
        try:
            late.writer.write(b"late")
            await late.writer.drain()
            proxy.resume()
            assert await asyncio.wait_for(client.reader.readexactly(4), 5) == b"ping"
            assert await asyncio.wait_for(late.reader.readexactly(4), 5) == b"late"
        finally:
            await late.close()
    finally:
        await client.close()


async def test_cut_while_paused_still_closes(proxy: TcpProxy) -> None:
    client = await Client.connect(proxy.port)
    try:
        assert await client.roundtrip(b"x") == b"x"
        proxy.pause()
        await proxy.cut()
        assert await client.closed_by_peer()
        assert proxy.connections == 0
    finally:
        await client.close()


async def test_unreachable_target_drops_the_client() -> None:
    # A port nothing listens on: bind one, learn it, release it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with TcpProxy("127.0.0.1", dead_port) as proxy:
        client = await Client.connect(proxy.port)
        try:
            assert await client.closed_by_peer()
        finally:
            await client.close()
        await eventually(lambda: proxy.connections == 0)


async def test_proxies_the_real_broker() -> None:
    async with TcpProxy(BROKER.hostname or "127.0.0.1", BROKER.port or 5672) as proxy:
        assert proxy.amqp_url() == f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        connection = await aio_pika.connect(proxy.amqp_url())
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"via proxy"), queue.name)
            message = await queue.get(timeout=5, no_ack=True)
            assert message.body == b"via proxy"
            assert proxy.connections == 1
        finally:
            await connection.close()
