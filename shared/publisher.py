"""A lean AMQP 0-9-1 publisher with publisher confirms: pamqp for framing, an asyncio.Protocol.

Why not aio-pika: its publish path costs about 350 µs of CPU per confirmed message, more than the
ingress's whole budget per request. This publisher does only what the ingress needs (one
connection, one confirm-mode channel, persistent mandatory publishes) and keeps the per-message
path small:

- the Basic.Publish method frame is marshalled once per (exchange, routing key) and cached;
- the content header is encoded directly for the few properties we send (pamqp's generic
  property encoder costs ~25 µs a message); everything else is marshalled by pamqp;
- frames are appended to one bytearray and flushed with a single transport.write per loop turn;
- confirms are matched by delivery tag in a dict; Basic.Ack is decoded without pamqp;
- timeouts need no task or timer per publish: every publish on a channel has the same timeout, so
  deadlines grow with the delivery tag and one loop.call_at on the oldest pending deadline serves
  them all.

`publish()` returns only once the broker confirmed the message and raises
`shared.errors.BrokerUnavailable` for every broker-side failure: not connected, blocked, nacked,
unroutable, no confirm in time, or the connection/channel closing with the message in flight.
A BrokerUnavailable does not prove the message was *not* enqueued (the broker may have taken it
just before the connection dropped); consumers must tolerate duplicates, keyed by message_id.

amqps:// URLs wrap the transport in TLS (the caller's SSLContext, else the system store, with the
host name always checked). Given several URLs (a cluster's nodes), it connects to the first that
answers and, when that connection is lost, tries the others starting with the next one, so a
node that went away is tried last.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
import struct
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, cast
from urllib.parse import quote, unquote, urlsplit

import pamqp.commands as spec
import pamqp.common
import pamqp.exceptions
import pamqp.frame
import structlog
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from shared.errors import BrokerCertificateError, BrokerUnavailable
from shared.tls import NoNodeAnswered, first_answering

__all__ = ["ConfirmedPublisher", "HeaderValue"]

HeaderValue = str | int | float | bool

_log = structlog.get_logger()

_CHANNEL: Final = 1
_FRAME_METHOD: Final = 1
_FRAME_HEADER: Final = 2
_FRAME_BODY: Final = 3
_FRAME_HEARTBEAT: Final = 8
_FRAME_END: Final = 0xCE
_FRAME_END_BYTES: Final = b"\xce"
# 7-byte frame header plus the frame-end octet: what a frame adds around its payload.
_FRAME_OVERHEAD: Final = 8
_DEFAULT_FRAME_MAX: Final = 131072
_BASIC_ACK_INDEX: Final = spec.Basic.Ack.index
_BASIC_CLASS_ID: Final = spec.Basic.frame_id

_FRAME_HEAD = struct.Struct(">BHI")
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_ACK_ARGS = struct.Struct(">QB")
# class id (Basic), weight, body size, property flags
_HEADER_START = struct.Struct(">HHQH")

# Basic.Properties flag bits, in wire order (AMQP 0-9-1 §4.2.6.1 / pamqp's Basic.Properties).
_P_CONTENT_TYPE: Final = 0x8000
_P_HEADERS: Final = 0x2000
_P_DELIVERY_MODE: Final = 0x1000
_P_CORRELATION_ID: Final = 0x0400
_P_MESSAGE_ID: Final = 0x0080
_P_TIMESTAMP: Final = 0x0040
_PERSISTENT: Final = b"\x02"

# The publish-frame cache is per connection; a runaway set of routing keys must not grow it forever.
_PUBLISH_FRAME_CACHE_MAX: Final = 4096
# Frames waiting in the transport above this mean the broker is not reading: stop taking
# publishes (ready goes False) rather than buffering without bound.
_WRITE_HIGH_WATER: Final = 4 * 1024 * 1024


def _shortstr(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{what} {value[:40]!r}... is longer than 255 bytes")
    return _U8.pack(len(raw)) + raw


# Header names are a small fixed set (envelope.py); their encoding is looked up, not rebuilt.
_HEADER_NAMES: dict[str, bytes] = {}
_HEADER_NAMES_MAX: Final = 256


def _header_name(key: str) -> bytes:
    name = _HEADER_NAMES.get(key)
    if name is None:
        name = _shortstr(key, "header name")
        if len(_HEADER_NAMES) < _HEADER_NAMES_MAX:
            _HEADER_NAMES[key] = name
    return name


def _encode_headers(headers: Mapping[str, HeaderValue]) -> bytes:
    """An AMQP field table for str/int/float/bool values.

    Floats go as 'd' (double): pamqp would send 'f' (single precision) and lose digits.
    """
    parts: list[bytes] = []
    for key, value in headers.items():
        parts.append(_header_name(key))
        # bool before int: bool is an int subclass.
        if value is True:
            parts.append(b"t\x01")
        elif value is False:
            parts.append(b"t\x00")
        elif isinstance(value, int):
            if -(2**31) <= value < 2**31:
                parts.append(b"I" + _I32.pack(value))
            elif -(2**63) <= value < 2**63:
                parts.append(b"l" + _I64.pack(value))
            else:
                raise ValueError(f"header {key!r}: integer out of the 64-bit range")
        elif isinstance(value, float):
            parts.append(b"d" + _F64.pack(value))
        elif isinstance(value, str):
            raw = value.encode()
            parts.append(b"S" + _U32.pack(len(raw)) + raw)
        else:
            raise TypeError(f"header {key!r}: {type(value).__name__} is not str/int/float/bool")
    table = b"".join(parts)
    return _U32.pack(len(table)) + table


def _encode_timestamp(value: datetime) -> bytes:
    # Same rule as pamqp: a naive datetime is taken as UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return _U64.pack(int(value.timestamp()))


def _marshal(frame: pamqp.frame.FrameTypes, channel: int) -> bytes:
    data: bytes = pamqp.frame.marshal(frame, channel)
    return data


@enum.unique
class _Conn(enum.IntEnum):
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


@enum.unique
class _Chan(enum.IntEnum):
    NONE = 0
    OPENING = 1  # Channel.Open sent
    SELECTING = 2  # Confirm.Select sent
    OPEN = 3
    CLOSING = 4  # we sent Channel.Close


class _Pending:
    """One publish waiting for its confirm."""

    __slots__ = ("deadline", "exchange", "future", "message_id", "returned", "routing_key")

    def __init__(
        self,
        future: asyncio.Future[None],
        deadline: float,
        message_id: str,
        exchange: str,
        routing_key: str,
    ) -> None:
        self.future = future
        self.deadline = deadline
        # What a Basic.Return is matched on.
        self.message_id = message_id
        self.exchange = exchange
        self.routing_key = routing_key
        # Set by Basic.Return: the broker will still ack, and that ack then means "failed".
        self.returned: str | None = None


class _Params:
    """What the URL and the constructor say about how to connect."""

    __slots__ = (
        "confirm_timeout_s",
        "connect_timeout_s",
        "connection_name",
        "heartbeat_s",
        "host",
        "password",
        "port",
        "tls",
        "user",
        "vhost",
    )

    def __init__(
        self,
        url: str,
        *,
        confirm_timeout_s: float,
        connection_name: str,
        heartbeat_s: int,
        connect_timeout_s: float,
    ) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"not an AMQP URL (scheme {parts.scheme!r}); expected amqp:// or amqps://"
            )
        self.tls = parts.scheme == "amqps"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (5671 if self.tls else 5672)
        self.user = unquote(parts.username) if parts.username is not None else "guest"
        self.password = unquote(parts.password) if parts.password is not None else "guest"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        self.vhost = unquote(path) if path else "/"
        if len(self.vhost.encode()) > 127:
            raise ValueError("the vhost is longer than 127 bytes")
        if confirm_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 <= heartbeat_s <= 65535:
            raise ValueError("heartbeat_s must be between 0 and 65535")
        self.confirm_timeout_s = confirm_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connection_name = connection_name
        self.heartbeat_s = heartbeat_s

    @property
    def where(self) -> str:
        """The broker address without credentials, safe to log."""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.host}:{self.port}/{quote(self.vhost, safe='')}"

    @property
    def address(self) -> str:
        """host:port, how an error names the broker."""
        return f"{self.host}:{self.port}"


class _HandshakeError(Exception):
    """The broker refused or broke off the connection handshake."""


class _Connection(asyncio.Protocol):
    """One AMQP connection with one confirm-mode channel (channel 1), driven by callbacks."""

    def __init__(self, owner: ConfirmedPublisher, params: _Params) -> None:
        self._owner = owner
        self._params = params
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.made = False
        self.state = _Conn.HANDSHAKE
        self.channel = _Chan.NONE
        self.opened: asyncio.Future[None] = self._loop.create_future()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._handed_over = False
        # Why the connection or channel is down, for the error a refused publish gets.
        self.down_reason = "connecting to the broker"
        self.blocked: str | None = None
        self._flow_active = True
        self._write_paused = False
        # Kept equal to _compute_ready(): the hot path reads one attribute.
        self.ready = False

        self._frame_max = _DEFAULT_FRAME_MAX
        self._body_chunk = _DEFAULT_FRAME_MAX - _FRAME_OVERHEAD
        self._heartbeat_s = 0
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._last_read = self._loop.time()
        self._wrote_since_tick = False

        self._wbuf = bytearray()
        self._flush_scheduled = False
        self._rbuf = bytearray()

        # Confirm state of the current channel incarnation.
        self._next_tag = 1
        # Every tag at or below this one has been resolved (advanced by multiple acks).
        self._floor = 0
        self._pending: dict[int, _Pending] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        # A Basic.Return is method, header, body frames: the Return waits for the header.
        self._returned: spec.Basic.Return | None = None

        self._publish_frames: dict[tuple[str, str], bytes] = {}
        self._content_types: dict[str, bytes] = {}

        self._channel_close_ok: asyncio.Future[None] | None = None
        self._connection_close_ok: asyncio.Future[None] | None = None

    # ----------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = transport = cast(asyncio.Transport, transport)
        self.made = True
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self._write(ProtocolHeader().marshal())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not _Conn.CLOSED:
            if self.state is _Conn.HANDSHAKE:
                reason = "the broker dropped the connection during the handshake"
            else:
                reason = "connection to the broker lost"
            if exc is not None:
                reason = f"{reason}: {exc}"
            if self.state is _Conn.CLOSING:
                # A close we asked for (or the broker's Connection.Close): keep its reason.
                reason = self.down_reason
            self._shutdown(reason)
        self._transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_ready()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_ready()

    def eof_received(self) -> bool | None:
        # Returning None closes the transport; connection_lost follows.
        return None

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        rbuf = self._rbuf
        buf: bytes | bytearray
        if rbuf:
            rbuf += data
            buf = rbuf
        else:
            buf = data
        size_all = len(buf)
        pos = 0
        head = _FRAME_HEAD.unpack_from
        try:
            while size_all - pos >= 7:
                ftype, channel, size = head(buf, pos)
                end = pos + 7 + size
                if end >= size_all:
                    break  # the frame-end octet has not arrived yet
                if buf[end] != _FRAME_END:
                    raise pamqp.exceptions.UnmarshalingException("frame", "bad frame-end octet")
                # Hot path: Basic.Ack (a 13-byte method) is what we receive in bulk.
                if (
                    ftype == _FRAME_METHOD
                    and size == 13
                    and _U32.unpack_from(buf, pos + 7)[0] == _BASIC_ACK_INDEX
                ):
                    tag, bits = _ACK_ARGS.unpack_from(buf, pos + 11)
                    self._on_ack(tag, bits & 1 == 1)
                    pos = end + 1
                    continue
                if ftype != _FRAME_HEARTBEAT:
                    # Unmarshal one frame at a time: a handler may close the connection.
                    self._on_frame(channel, bytes(buf[pos : end + 1]))
                pos = end + 1
                if self.state is _Conn.CLOSED:
                    return
        except pamqp.exceptions.UnmarshalingException as exc:
            self._protocol_error(f"could not parse a frame from the broker: {exc}")
            return
        if pos == 0 and buf[:4] == b"AMQP":
            # The broker answers an unsupported protocol header with its own, then closes.
            self._protocol_error("the broker refused the AMQP 0-9-1 protocol header")
            return
        if pos == size_all:
            if rbuf:
                rbuf.clear()
        elif buf is rbuf:
            del rbuf[:pos]
        else:
            rbuf += memoryview(buf)[pos:]

    # ----------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        self._wbuf += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        buf = self._wbuf
        if not buf:
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            buf.clear()
            return
        # Hand the bytearray itself to the transport (it may keep a reference) and start anew.
        self._wbuf = bytearray()
        transport.write(buf)
        self._wrote_since_tick = True

    def _send(self, method: pamqp.frame.FrameTypes, channel: int) -> None:
        self._write(_marshal(method, channel))

    # ----------------------------------------------------------------- publishing

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: Mapping[str, HeaderValue] | None,
        correlation_id: str | None,
        content_type: str,
        timestamp: datetime | None,
    ) -> asyncio.Future[None]:
        """Write one publish and return the future its confirm resolves. Caller checked ready."""
        if not message_id:
            raise ValueError("message_id must not be empty")
        key = (exchange, routing_key)
        method = self._publish_frames.get(key)
        if method is None:
            method = _marshal(
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
                _CHANNEL,
            )
            if len(self._publish_frames) >= _PUBLISH_FRAME_CACHE_MAX:
                self._publish_frames.clear()
            self._publish_frames[key] = method

        # Properties in wire order: content_type, headers, delivery_mode, correlation_id,
        # message_id, timestamp.
        flags = _P_DELIVERY_MODE | _P_MESSAGE_ID
        props: list[bytes] = []
        if content_type:
            ct = self._content_types.get(content_type)
            if ct is None:
                ct = _shortstr(content_type, "content_type")
                if len(self._content_types) < 64:
                    self._content_types[content_type] = ct
            flags |= _P_CONTENT_TYPE
            props.append(ct)
        if headers:
            flags |= _P_HEADERS
            props.append(_encode_headers(headers))
        props.append(_PERSISTENT)
        if correlation_id:
            flags |= _P_CORRELATION_ID
            props.append(_shortstr(correlation_id, "correlation_id"))
        props.append(_shortstr(message_id, "message_id"))
        if timestamp is not None:
            flags |= _P_TIMESTAMP
            props.append(_encode_timestamp(timestamp))
        size = len(body)
        header = _HEADER_START.pack(_BASIC_CLASS_ID, 0, size, flags) + b"".join(props)
        if len(header) + _FRAME_OVERHEAD > self._frame_max:
            raise ValueError("message properties do not fit in one frame (headers too large)")

        wbuf = self._wbuf
        wbuf += method
        wbuf += _FRAME_HEAD.pack(_FRAME_HEADER, _CHANNEL, len(header))
        wbuf += header
        wbuf += _FRAME_END_BYTES
        chunk = self._body_chunk
        if size <= chunk:
            if size:
                wbuf += _FRAME_HEAD.pack(_FRAME_BODY, _CHANNEL, size)
                wbuf += body
                wbuf += _FRAME_END_BYTES
        else:
            view = memoryview(body)
            for start in range(0, size, chunk):
                piece = view[start : start + chunk]
                wbuf += _FRAME_HEAD.pack(_FRAME_BODY, _CHANNEL, len(piece))
                wbuf += piece
                wbuf += _FRAME_END_BYTES
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()
        deadline = loop.time() + self._params.confirm_timeout_s
        tag = self._next_tag
        self._next_tag = tag + 1
        self._pending[tag] = _Pending(future, deadline, message_id, exchange, routing_key)
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_at(deadline, self._sweep)
        return future

    @property
    def pending_count(self) -> int:
        """Publishes written and not yet confirmed, failed or timed out."""
        return len(self._pending)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        pending = self._pending
        if multiple:
            floor = self._floor
            if tag > floor:
                pop = pending.pop
                for t in range(floor + 1, tag + 1):
                    entry = pop(t, None)
                    if entry is not None:
                        self._resolve(entry)
                self._floor = tag
        else:
            entry = pending.pop(tag, None)
            if entry is not None:
                self._resolve(entry)
            if tag == self._floor + 1:
                self._floor = tag
        if not pending and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    @staticmethod
    def _resolve(entry: _Pending) -> None:
        future = entry.future
        if future.done():
            return  # the caller was cancelled
        if entry.returned is None:
            future.set_result(None)
        else:
            future.set_exception(BrokerUnavailable(f"unroutable: {entry.returned}"))

    def _on_nack(self, tag: int, multiple: bool) -> None:
        pending = self._pending
        if multiple:
            tags = [t for t in pending if t <= tag]
            self._floor = max(self._floor, tag)
        else:
            tags = [tag] if tag in pending else []
        for t in tags:
            entry = pending.pop(t)
            self._fail(entry, "the broker nacked the message: it did not take it")
        if not pending and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _on_returned(self, message_id: object) -> None:
        """Mark the publish a Basic.Return (whose header carries `message_id`) belongs to."""
        returned, self._returned = self._returned, None
        if returned is None or not isinstance(message_id, str):
            return
        exchange, routing_key = returned.exchange, returned.routing_key
        # Returns arrive in publish order, so the oldest unmarked publish with the same id,
        # exchange and routing key is this one. A linear scan: returns are rare.
        for entry in self._pending.values():
            if (
                entry.returned is None
                and entry.message_id == message_id
                and entry.exchange == exchange
                and entry.routing_key == routing_key
            ):
                entry.returned = (
                    f"{returned.reply_code} {returned.reply_text} "
                    f"(exchange {exchange!r}, routing key {routing_key!r})"
                )
                return

    @staticmethod
    def _fail(entry: _Pending, reason: str) -> None:
        if not entry.future.done():
            entry.future.set_exception(BrokerUnavailable(reason))

    def _sweep(self) -> None:
        """Fail every publish whose confirm deadline passed; re-arm for the oldest left."""
        self._sweep_handle = None
        pending = self._pending
        if not pending:
            return
        now = self._loop.time()
        expired: list[int] = []
        next_deadline = 0.0
        for tag, entry in pending.items():
            if entry.deadline > now:
                next_deadline = entry.deadline
                break
            expired.append(tag)
        reason = f"no confirm from the broker within {self._params.confirm_timeout_s:g} s"
        for tag in expired:
            self._fail(pending.pop(tag), reason)
        if pending:
            self._sweep_handle = self._loop.call_at(next_deadline, self._sweep)
        elif self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            self._fail(entry, reason)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        self._returned = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # ----------------------------------------------------------------- incoming frames

    def _on_frame(self, channel: int, raw: bytes) -> None:
        _, _, frame = pamqp.frame.unmarshal(raw)
        if channel == 0:
            self._on_connection_frame(frame)
        elif channel == _CHANNEL:
            self._on_channel_frame(frame)
        else:
            _log.warning("amqp frame on an unknown channel", channel=channel, frame=frame.name)

    def _on_connection_frame(self, frame: pamqp.frame.FrameTypes) -> None:
        if isinstance(frame, spec.Connection.Start):
            self._on_start(frame)
        elif isinstance(frame, spec.Connection.Tune):
            self._on_tune(frame)
        elif isinstance(frame, spec.Connection.OpenOk):
            self.state = _Conn.OPEN
            self._open_channel()
        elif isinstance(frame, spec.Connection.Close):
            self._on_connection_close(frame)
        elif isinstance(frame, spec.Connection.CloseOk):
            if self._connection_close_ok is not None and not self._connection_close_ok.done():
                self._connection_close_ok.set_result(None)
            if self._transport is not None:
                self._transport.close()
        elif isinstance(frame, spec.Connection.Blocked):
            self.blocked = str(frame.reason or "no reason given")
            _log.warning("amqp connection blocked by the broker", reason=self.blocked)
            self._update_ready()
        elif isinstance(frame, spec.Connection.Unblocked):
            self.blocked = None
            _log.info("amqp connection unblocked")
            self._update_ready()
        else:
            _log.warning("amqp unexpected connection frame", frame=frame.name)

    def _on_start(self, frame: spec.Connection.Start) -> None:
        mechanisms = str(frame.mechanisms).split()
        if "PLAIN" not in mechanisms:
            self._handshake_failed(f"the broker offers no PLAIN login (only {mechanisms})")
            return
        capabilities: pamqp.common.FieldTable = {
            "publisher_confirms": True,
            "connection.blocked": True,
            "basic.nack": True,
            "consumer_cancel_notify": True,
            "authentication_failure_close": True,
        }
        client_properties: pamqp.common.FieldTable = {
            "product": "voucher-bridge",
            "platform": f"Python {sys.version.split()[0]}",
            "connection_name": self._params.connection_name,
            "capabilities": capabilities,
        }
        login = f"\x00{self._params.user}\x00{self._params.password}"
        self._send(
            spec.Connection.StartOk(
                client_properties=client_properties,
                mechanism="PLAIN",
                response=login,
                locale="en_US",
            ),
            0,
        )

    def _on_tune(self, frame: spec.Connection.Tune) -> None:
        frame_max = frame.frame_max or _DEFAULT_FRAME_MAX
        self._frame_max = frame_max
        self._body_chunk = frame_max - _FRAME_OVERHEAD
        ours, theirs = self._params.heartbeat_s, frame.heartbeat or 0
        # Both non-zero: the smaller wins; otherwise whichever side asked for one (RabbitMQ's rule).
        heartbeat = min(ours, theirs) if ours and theirs else max(ours, theirs)
        self._heartbeat_s = heartbeat
        self._send(
            spec.Connection.TuneOk(
                channel_max=frame.channel_max or 0, frame_max=frame_max, heartbeat=heartbeat
            ),
            0,
        )
        self._send(spec.Connection.Open(virtual_host=self._params.vhost), 0)
        if heartbeat:
            self._heartbeat_handle = self._loop.call_later(heartbeat / 2, self._heartbeat_tick)

    def _heartbeat_tick(self) -> None:
        self._heartbeat_handle = None
        if self.state is _Conn.CLOSED:
            return
        interval = self._heartbeat_s
        if self._loop.time() - self._last_read >= 2 * interval:
            _log.warning("amqp heartbeat missed: connection presumed dead", heartbeat_s=interval)
            self._abort(f"no data from the broker for {2 * interval} s (missed heartbeats)")
            return
        if not self._wrote_since_tick:
            self._write(Heartbeat.marshal())
        self._wrote_since_tick = False
        self._heartbeat_handle = self._loop.call_later(interval / 2, self._heartbeat_tick)

    def _on_connection_close(self, frame: spec.Connection.Close) -> None:
        reason = f"broker closed the connection: {frame.reply_code} {frame.reply_text}"
        self._send(spec.Connection.CloseOk(), 0)
        if self.state is _Conn.HANDSHAKE:
            self._flush()  # the CloseOk goes out before the abort
            self._handshake_failed(reason)
            return
        _log.warning("amqp connection closed by the broker", reason=reason)
        self.down_reason = reason
        self.state = _Conn.CLOSING
        self._fail_all(reason)
        self._update_ready()
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _open_channel(self) -> None:
        self.channel = _Chan.OPENING
        self._send(spec.Channel.Open(), _CHANNEL)

    def _on_channel_frame(self, frame: pamqp.frame.FrameTypes) -> None:
        if isinstance(frame, spec.Basic.Nack):
            self._on_nack(frame.delivery_tag, bool(frame.multiple))
        elif isinstance(frame, spec.Basic.Ack):
            self._on_ack(frame.delivery_tag, bool(frame.multiple))
        elif isinstance(frame, spec.Basic.Return):
            self._returned = frame
        elif isinstance(frame, ContentHeader):
            self._on_returned(frame.properties.message_id)
        elif isinstance(frame, ContentBody):
            pass  # body of a returned message: the header already matched it
        elif isinstance(frame, spec.Channel.OpenOk):
            self.channel = _Chan.SELECTING
            self._send(spec.Confirm.Select(), _CHANNEL)
        elif isinstance(frame, spec.Confirm.SelectOk):
            # A new channel incarnation: the broker numbers deliveries from 1 again.
            self._next_tag = 1
            self._floor = 0
            self.channel = _Chan.OPEN
            if not self.opened.done():
                self.opened.set_result(None)
            self._update_ready()
        elif isinstance(frame, spec.Channel.Close):
            self._on_channel_close(frame)
        elif isinstance(frame, spec.Channel.CloseOk):
            self.channel = _Chan.NONE
            if self._channel_close_ok is not None and not self._channel_close_ok.done():
                self._channel_close_ok.set_result(None)
        elif isinstance(frame, spec.Channel.Flow):
            self._flow_active = bool(frame.active)
            self._send(spec.Channel.FlowOk(active=frame.active), _CHANNEL)
            self._update_ready()
        else:
            _log.warning("amqp unexpected channel frame", frame=frame.name)

    def _on_channel_close(self, frame: spec.Channel.Close) -> None:
        reason = f"broker closed the channel: {frame.reply_code} {frame.reply_text}"
        self._send(spec.Channel.CloseOk(), _CHANNEL)
        if self.state is _Conn.HANDSHAKE:
            self._flush()
            self._handshake_failed(reason)
            return
        if self._channel_close_ok is not None and not self._channel_close_ok.done():
            # Both sides closed the channel at once: the broker's Close ends ours too.
            self._channel_close_ok.set_result(None)
        _log.warning("amqp channel closed by the broker", reason=reason)
        self.down_reason = f"channel reopening after: {reason}"
        self._fail_all(reason)
        self._flow_active = True
        if self.state is _Conn.OPEN and not self._owner._closed:
            # Publishes written after the broker's Close were discarded by it and have just
            # failed with the rest; the new channel starts from delivery tag 1.
            self._open_channel()
        else:
            self.channel = _Chan.NONE
        self._update_ready()

    # ----------------------------------------------------------------- state

    def _compute_ready(self) -> bool:
        return (
            self.state is _Conn.OPEN
            and self.channel is _Chan.OPEN
            and self.blocked is None
            and self._flow_active
            and not self._write_paused
        )

    def _update_ready(self) -> None:
        ready = self._compute_ready()
        if ready != self.ready:
            self.ready = ready
            if self._handed_over:
                self._owner._readiness_changed()

    def not_ready_reason(self) -> str:
        """Why publishes are refused right now."""
        if self.blocked is not None:
            return f"broker blocked publishing: {self.blocked}"
        if self._write_paused:
            return "the broker is not reading: write buffer full"
        if not self._flow_active:
            return "broker paused the channel (channel.flow)"
        return self.down_reason

    def hand_over(self) -> None:
        """The publisher adopted this connection: report readiness and loss from now on."""
        self._handed_over = True

    def _fail_opened(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(_HandshakeError(reason))
            # The connect attempt may have timed out already: don't log it as never retrieved.
            self.opened.exception()

    def _handshake_failed(self, reason: str) -> None:
        self._fail_opened(reason)
        self._abort(reason)

    def _protocol_error(self, reason: str) -> None:
        _log.error("amqp protocol error", reason=reason)
        self._fail_opened(reason)
        self._abort(reason)

    def _abort(self, reason: str) -> None:
        self._shutdown(reason)
        if self._transport is not None:
            self._transport.abort()

    def _shutdown(self, reason: str) -> None:
        """The connection is gone: fail what waits on it and tell the publisher, once."""
        if self.state is _Conn.CLOSED:
            return
        self.state = _Conn.CLOSED
        self.channel = _Chan.NONE
        self.down_reason = reason
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
            self._heartbeat_handle = None
        self._fail_all(reason)
        self._fail_opened(reason)
        for waiter in (self._channel_close_ok, self._connection_close_ok):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._update_ready()
        if self._handed_over:
            self._owner._connection_lost(self, reason)

    def abort(self, reason: str) -> None:
        """Drop the connection without the closing handshake."""
        self._abort(reason)

    async def close(self, timeout_s: float, reason: str) -> None:
        """Wait (bounded) for in-flight confirms, then close channel and connection cleanly."""
        loop = self._loop
        deadline = loop.time() + max(timeout_s, 0.0)
        if self._pending:
            self._drained = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._drained
        self._fail_all(f"{reason} before the broker confirmed")
        # The closing handshake gets what is left of the budget, but at least a moment.
        handshake_deadline = max(deadline, loop.time() + 0.5)
        clean = False
        if self.state is _Conn.OPEN and self._transport is not None:
            self.down_reason = reason
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(handshake_deadline):
                    if self.channel is _Chan.OPEN:
                        self.channel = _Chan.CLOSING
                        self._update_ready()
                        self._channel_close_ok = loop.create_future()
                        self._send(spec.Channel.Close(200, reason, 0, 0), _CHANNEL)
                        await self._channel_close_ok
                    if self.state is _Conn.OPEN:
                        self.state = _Conn.CLOSING
                        self._update_ready()
                        self._connection_close_ok = loop.create_future()
                        self._send(spec.Connection.Close(200, reason, 0, 0), 0)
                        await self._connection_close_ok
                        clean = True
        if self._transport is not None:
            if clean:
                self._transport.close()
            else:
                self._abort(reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.shield(self.lost)
        self._shutdown(reason)


class ConfirmedPublisher:
    """Publishes persistent, mandatory messages and returns only once the broker confirmed them.

    One connection, one confirm-mode channel, reconnecting in the background with exponential
    backoff. Every broker-side failure surfaces as `BrokerUnavailable(reason)`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        confirm_timeout_s: float = 5.0,
        connection_name: str = "voucher-bridge ingress",
        heartbeat_s: int = 30,
        connect_timeout_s: float = 5.0,
        reconnect_max_delay_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Check the settings; nothing connects before `start()`.

        `url` is one broker URL, or several (a sequence, or one comma-separated string): a
        cluster's nodes, tried in order. amqps:// URLs use `ssl_context`, by default one that
        trusts the system store; hostname checks cannot be turned off.
        """
        urls = [u for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("no broker URL given")
        self._nodes = [
            _Params(
                u,
                confirm_timeout_s=confirm_timeout_s,
                connection_name=connection_name,
                heartbeat_s=heartbeat_s,
                connect_timeout_s=connect_timeout_s,
            )
            for u in urls
        ]
        if ssl_context is None and any(node.tls for node in self._nodes):
            ssl_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ssl_context is not None and (
            not ssl_context.check_hostname or ssl_context.verify_mode is not ssl.CERT_REQUIRED
        ):
            raise ValueError("the SSL context must verify the certificate and the host name")
        self._ssl_context = ssl_context
        # The node connected to (or the first); the next connect starts after it.
        self._params = self._nodes[0]
        self._next_node = 0
        self._reconnect_max_delay_s = max(reconnect_max_delay_s, 0.1)
        self._conn: _Connection | None = None
        self._started = False
        self._closed = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()
        self._last_failure = "not started"

    # ----------------------------------------------------------------- public API

    async def start(self) -> None:
        """Connect once; on failure keep reconnecting in the background instead of raising."""
        if self._started:
            return
        self._started = True
        try:
            await self._connect_once()
        except BrokerCertificateError:
            # Retrying cannot make a certificate verify: stop with the reason.
            self._closed = True
            raise
        except Exception as exc:
            self._last_failure = _describe(exc)
            _log.warning(
                "amqp connect failed, retrying in the background",
                broker=self._params.where,
                error=_describe(exc),
            )
            self._spawn_reconnect(first_delay_s=0.1)

    @property
    def ready(self) -> bool:
        """Connected, channel open in confirm mode, and the broker is not blocking publishes."""
        conn = self._conn
        return conn is not None and conn.ready and not self._closed

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for `ready`; return whether it is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.ready:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._ready_event.wait()
        return True

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, HeaderValue] | None = None,
        correlation_id: str | None = None,
        content_type: str = "application/json",
        timestamp: datetime | None = None,
    ) -> None:
        """Publish persistently with mandatory=True; return once the broker confirmed it.

        Raises BrokerUnavailable when not ready (disconnected, reconnecting, blocked), when the
        broker nacks or returns the message (unroutable), when no confirm arrives within
        confirm_timeout_s, or when the connection or channel closes first. ValueError/TypeError
        mean the arguments cannot be encoded (empty message_id, strings over 255 bytes, ...).
        """
        conn = self._conn
        if conn is None or not conn.ready or self._closed:
            raise BrokerUnavailable(self._not_ready_reason())
        await conn.publish(
            exchange,
            routing_key,
            body,
            message_id,
            headers,
            correlation_id,
            content_type,
            timestamp,
        )

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop reconnecting, wait up to timeout_s for in-flight confirms, then close cleanly.

        Publishes still unconfirmed at the deadline fail with BrokerUnavailable. The closing
        handshake itself gets whatever is left of timeout_s, at least half a second.
        """
        if self._closed:
            return
        self._closed = True
        self._ready_event.clear()
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn = self._conn
        if conn is not None:
            await conn.close(timeout_s, "publisher closed")
            self._conn = None
        _log.info("amqp publisher closed", broker=self._params.where)

    # ----------------------------------------------------------------- internals

    def _not_ready_reason(self) -> str:
        if self._closed:
            return "publisher is closed"
        if not self._started:
            return "publisher not started"
        conn = self._conn
        if conn is None:
            return f"not connected to the broker, reconnecting (last error: {self._last_failure})"
        return conn.not_ready_reason()

    async def _connect_once(self) -> None:
        """Connect to the first node that answers, starting after the one connected to last.

        Raises BrokerCertificateError if some node's certificate was refused and none answered,
        else the last node's error (all of them in its message when there are several).
        """

        async def attempt(index: int) -> None:
            await self._connect_node(self._nodes[index])

        addresses = [params.address for params in self._nodes]
        try:
            _, index = await first_answering(addresses, self._next_node, attempt, _describe)
        except NoNodeAnswered as error:
            last = error.__cause__
            assert isinstance(last, Exception)
            if len(addresses) == 1:
                raise last from last.__cause__  # one node: its own error, its chain kept
            raise ConnectionError(str(error)) from last
        self._next_node = (index + 1) % len(addresses)

    async def _connect_node(self, params: _Params) -> None:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, params)
        try:
            async with asyncio.timeout(params.connect_timeout_s):
                if params.tls:
                    await loop.create_connection(
                        lambda: conn,
                        params.host,
                        params.port,
                        ssl=self._ssl_context,
                        server_hostname=params.host,
                    )
                else:
                    await loop.create_connection(lambda: conn, params.host, params.port)
                await asyncio.shield(conn.opened)
        except BaseException as exc:
            reason = "connect timed out" if isinstance(exc, TimeoutError) else _describe(exc)
            conn.abort(reason)
            if conn.made:
                # Let the transport finish closing so no socket outlives this attempt.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(conn.lost)
            if isinstance(exc, TimeoutError):
                raise TimeoutError(
                    f"not connected and through the AMQP handshake within "
                    f"{params.connect_timeout_s:g} s"
                ) from exc
            raise
        if self._closed:
            await conn.close(1.0, "publisher closed")
            return
        conn.hand_over()
        self._conn = conn
        self._params = params
        self._last_failure = ""
        _log.info(
            "amqp publisher connected",
            broker=params.where,
            heartbeat_s=conn._heartbeat_s,
            frame_max=conn._frame_max,
        )
        self._readiness_changed()

    def _spawn_reconnect(self, first_delay_s: float) -> None:
        if self._closed or (self._reconnect_task is not None and not self._reconnect_task.done()):
            return
        self._reconnect_task = asyncio.get_running_loop().create_task(
            self._reconnect(first_delay_s), name="amqp-publisher-reconnect"
        )

    async def _reconnect(self, first_delay_s: float) -> None:
        delay = first_delay_s
        max_delay = self._reconnect_max_delay_s
        while not self._closed and self._conn is None:
            if delay:
                await asyncio.sleep(delay)  # backoff, not synchronisation
            try:
                await self._connect_once()
                return
            except Exception as exc:
                self._last_failure = _describe(exc)
                delay = min(max(delay * 2, 0.1), max_delay)
                _log.warning(
                    "amqp reconnect failed",
                    broker=self._params.where,
                    error=_describe(exc),
                    retry_in_s=round(delay, 3),
                )

    def _connection_lost(self, conn: _Connection, reason: str) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._last_failure = reason
        self._ready_event.clear()
        if self._closed:
            return
        _log.warning("amqp connection lost, reconnecting", broker=self._params.where, reason=reason)
        self._spawn_reconnect(first_delay_s=0.0)

    def _readiness_changed(self) -> None:
        if self.ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()


def _describe(exc: BaseException) -> str:
    """A short, credential-free description of why a connect attempt failed."""
    text = str(exc)
    if isinstance(exc, _HandshakeError | TimeoutError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
