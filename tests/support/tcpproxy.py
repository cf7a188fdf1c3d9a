"""A small asyncio TCP proxy that fault tests put between a client and the real broker.

It can cut every connection at once (and refuse new ones), or pause forwarding while keeping the
sockets open, which is what a hung network looks like to both ends. Pausing stops *reading* on
both sides, so the kernel buffers fill and TCP back-pressure holds the bytes: nothing is dropped,
and `resume()` delivers them late, as a network that recovers would.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit, urlunsplit

# Above this much unsent data towards one side, stop reading from the other: memory stays bounded.
_HIGH_WATER = 256 * 1024


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: the client's (accepted) or the upstream's (dialled)."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.lost: asyncio.Future[None] = link.proxy.loop.create_future()
        # Bytes this side has received before its peer existed (client data before upstream is up).
        self.early: bytearray = bytearray()
        self.reading = True
        # True while this side's own write buffer is above the high-water mark.
        self.write_blocked = False
        self.got_eof = False

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        self.link.side_made(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.early += data
            return
        peer.send(data)

    def eof_received(self) -> bool | None:
        # Half-close: pass the FIN on and keep the other direction open until it ends too.
        peer = self.peer
        if peer is None or peer.transport is None or not peer.transport.can_write_eof():
            return None
        self.got_eof = True
        peer.transport.write_eof()
        if peer.got_eof:
            self.link.finish()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.link.side_lost(self)

    def pause_writing(self) -> None:
        self.write_blocked = True
        if self.peer is not None:
            self.peer.apply_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self.peer is not None:
            self.peer.apply_reading()

    # reading control

    def apply_reading(self) -> None:
        """Read only while the proxy flows, the peer is connected and its buffer has room."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        peer = self.peer
        want = (
            not self.link.proxy.paused
            and peer is not None
            and peer.transport is not None
            and not peer.write_blocked
        )
        if want and not self.reading:
            transport.resume_reading()
            self.reading = True
        elif not want and self.reading:
            transport.pause_reading()
            self.reading = False

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Link:
    """A proxied connection: the accepted client side and the upstream side dialled for it."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.upstream: _Side | None = None
        self.dialing: asyncio.Task[None] | None = None
        self.closed = False
        self.finishing = False

    def side_made(self, side: _Side) -> None:
        if side is self.client:
            if self.proxy.refusing:
                # A cut network: the TCP handshake succeeds, then the connection drops at once.
                side.abort()
                return
            self.proxy.links.add(self)
            # Hold the client's bytes in the kernel until upstream is connected.
            side.apply_reading()
            self.dialing = self.proxy.loop.create_task(self._dial())
        else:
            self.upstream = side
            if self.closed:
                side.abort()
                return
            self.client.peer = side
            side.peer = self.client
            if self.client.early:
                side.send(bytes(self.client.early))
                self.client.early.clear()
            self.client.apply_reading()
            side.apply_reading()

    async def _dial(self) -> None:
        proxy = self.proxy
        try:
            await proxy.loop.create_connection(
                lambda: _Side(self), proxy.target_host, proxy.target_port
            )
        except OSError:
            self.close()

    def side_lost(self, side: _Side) -> None:
        if self.finishing:
            # Both directions ended cleanly; the link is gone once both sockets are.
            if self.client.lost.done() and (self.upstream is None or self.upstream.lost.done()):
                self.proxy.links.discard(self)
            return
        # Either side gone means the connection is gone: drop the other side too.
        self.close()

    def finish(self) -> None:
        """Both directions ended cleanly: close both sockets once their buffers are flushed."""
        self.finishing = True
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.links.discard(self)
        if self.dialing is not None and not self.dialing.done():
            self.dialing.cancel()
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()

    async def wait_closed(self) -> None:
        waits: list[asyncio.Future[None]] = [self.client.lost]
        if self.dialing is not None:
            await asyncio.gather(self.dialing, return_exceptions=True)
        if self.upstream is not None and self.upstream.transport is not None:
            waits.append(self.upstream.lost)
        if self.client.transport is None:
            return
        await asyncio.gather(*waits)


class TcpProxy:
    """Forward 127.0.0.1:<port> to target_host:target_port, with faults on demand.

    Use as `async with TcpProxy(host, port) as proxy:`; `proxy.amqp_url()` is the broker's URL
    through the proxy.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.links: set[_Link] = set()
        self.paused = False
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("TcpProxy.start() was not called")
        return self._loop

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a port the OS picks."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Link(self).client, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._server is None:
            raise RuntimeError("TcpProxy.start() was not called")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url_through(self, url: str) -> str:
        """`url` (its user, password and path kept) reaching its server through this proxy."""
        parts = urlsplit(url)
        credentials, _, _ = parts.netloc.rpartition("@")
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def amqp_url(self, user: str = "guest", password: str = "guest") -> str:
        """The AMQP URL of the target broker, reached through this proxy (default vhost)."""
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    @property
    def connections(self) -> int:
        """How many proxied connections are live (not closed, nor closing after both EOFs)."""
        return sum(1 for link in self.links if not link.finishing)

    async def cut(self) -> None:
        """Drop every live connection at once, both sides, and refuse new ones until restore()."""
        self.refusing = True
        links = list(self.links)
        for link in links:
            link.close()
        await asyncio.gather(*(link.wait_closed() for link in links))

    async def restore(self) -> None:
        """Accept and forward new connections again after cut()."""
        self.refusing = False

    def pause(self) -> None:
        """Keep every connection open but forward nothing either way: a hung network."""
        self.paused = True
        self._apply_reading()

    def resume(self) -> None:
        """Forward again, including whatever the kernel held back while paused."""
        self.paused = False
        self._apply_reading()

    def _apply_reading(self) -> None:
        for link in self.links:
            link.client.apply_reading()
            if link.upstream is not None:
                link.upstream.apply_reading()

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        links = list(self.links)
        for link in links:
            link.close()
        await asyncio.gather(*(link.wait_closed() for link in links))
        await server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# PostgreSQL's port when a URL names none.
POSTGRES_PORT = 5432


def proxy_to(url: str, default_port: int) -> TcpProxy:
    """A proxy in front of the server `url` names."""
    parts = urlsplit(url)
    return TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port)
