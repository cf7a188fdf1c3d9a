"""ConfirmedPublisher against the real broker, with faults injected through TcpProxy."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pamqp.commands as spec
import pamqp.decode
import pamqp.frame
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from shared.errors import BrokerUnavailable
from shared.publisher import ConfirmedPublisher, HeaderValue, _Connection, _encode_headers
from tests.conftest import AMQP_URL
from tests.support.tcpproxy import TcpProxy

BROKER = urlsplit(AMQP_URL)

MakePublisher = Callable[..., Awaitable[ConfirmedPublisher]]


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after timeout_s.

    For states nothing signals (a connection noticed gone, a socket closed by the peer).
    """
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - deadline-bounded poll, nothing to wait on
            await asyncio.sleep(0.01)


def live(publisher: ConfirmedPublisher) -> _Connection:
    """The publisher's current connection (tests reach in to inject frames and count pending)."""
    conn = publisher._conn
    assert conn is not None, "publisher is not connected"
    return conn


async def until_pending(publisher: ConfirmedPublisher, count: int) -> None:
    """Yield to the loop until `count` publishes are written and waiting for their confirm."""
    async with asyncio.timeout(5):
        while live(publisher).pending_count < count:  # noqa: ASYNC110 - lets the tasks run
            await asyncio.sleep(0)


@pytest.fixture
async def make_publisher() -> AsyncIterator[MakePublisher]:
    """Start publishers (direct to the broker unless a url is given); close them all afterwards."""
    made: list[ConfirmedPublisher] = []

    async def make(url: str = AMQP_URL, *, wait: bool = True, **options: Any) -> ConfirmedPublisher:
        options.setdefault("reconnect_max_delay_s", 0.5)
        options.setdefault("connect_timeout_s", 2.0)
        publisher = ConfirmedPublisher(url, **options)
        made.append(publisher)
        await publisher.start()
        if wait:
            assert await publisher.wait_ready(10)
        return publisher

    yield make
    for publisher in made:
        await publisher.close(2.0)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy(BROKER.hostname or "127.0.0.1", BROKER.port or 5672) as proxy:
        yield proxy


class Scratch:
    """Queues and exchanges of one test, with uuid names, deleted at the end."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def name(self, what: str) -> str:
        return f"t-pub-{what}-{uuid.uuid4().hex[:12]}"

    async def quorum_queue(self) -> str:
        name = self.name("q")
        self.queues.append(name)
        await self.channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        return name

    async def classic_queue(self, **arguments: Any) -> str:
        name = self.name("cq")
        self.queues.append(name)
        await self.channel.declare_queue(name, durable=False, arguments=arguments)
        return name

    async def direct_exchange(self) -> str:
        name = self.name("x")
        self.exchanges.append(name)
        await self.channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=False)
        return name

    async def count(self, queue: str) -> int:
        # A fresh passive declare each time (a robust channel would answer from its cache).
        result = await (await self.channel.get_queue(queue, ensure=False)).declare()
        assert result.message_count is not None
        return int(result.message_count)

    async def wait_count(self, queue: str, expected: int) -> None:
        """Poll the queue's message count until it is `expected` (fail after 10 s)."""
        async with asyncio.timeout(10):
            while (count := await self.count(queue)) != expected:
                assert count < expected, f"{count} messages, expected {expected}"
                await asyncio.sleep(0.05)


@pytest.fixture
async def scratch(amqp: AbstractConnection) -> AsyncIterator[Scratch]:
    async with amqp.channel() as channel:
        scratch = Scratch(channel)
        yield scratch
    # A fresh channel: a test may have left the first one closed by the broker.
    async with amqp.channel() as channel:
        for queue in scratch.queues:
            await channel.queue_delete(queue)
        for exchange in scratch.exchanges:
            await channel.exchange_delete(exchange)


# --------------------------------------------------------------------------- happy path


async def test_confirmed_message_is_stored_exactly(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher()
    body = b'{"voucher": "V-1", "note": "\xc3\xa9\x00\xff binary-safe"}'
    sent_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers: dict[str, HeaderValue] = {
        "x-route": "voucher.reserved",
        "x-attempt": 3,
        "x-ratio": 0.1,
        "x-flag": True,
    }

    await publisher.publish(
        "",
        queue,
        body,
        message_id="msg-exact-1",
        headers=headers,
        correlation_id="corr-1",
        content_type="application/json",
        timestamp=sent_at,
    )

    channel = scratch.channel
    message = await (await channel.get_queue(queue, ensure=False)).get(timeout=5, no_ack=True)
    assert message.body == body
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == "msg-exact-1"
    assert message.correlation_id == "corr-1"
    assert message.content_type == "application/json"
    assert message.timestamp == sent_at
    # Quorum queues add x-delivery-count; ours must all be there, floats at full precision.
    assert {k: message.headers[k] for k in headers} == headers


async def test_bodies_larger_than_frame_max_and_empty_bodies(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher()
    big = bytes(range(256)) * 1200  # 300 KiB: three body frames at frame_max 128 KiB
    await publisher.publish("", queue, big, message_id="big")
    await publisher.publish("", queue, b"", message_id="empty")

    declared = await scratch.channel.get_queue(queue, ensure=False)
    first = await declared.get(timeout=5, no_ack=True)
    second = await declared.get(timeout=5, no_ack=True)
    assert (first.message_id, first.body) == ("big", big)
    assert (second.message_id, second.body) == ("empty", b"")


async def test_2000_concurrent_publishes_are_all_confirmed_and_stored(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher()
    await asyncio.gather(
        *(
            publisher.publish("", queue, f'{{"n": {i}}}'.encode(), message_id=f"m-{i}")
            for i in range(2000)
        )
    )
    assert live(publisher).pending_count == 0
    await scratch.wait_count(queue, 2000)


# --------------------------------------------------------------------------- broker refusals


async def test_unroutable_message_fails_and_the_next_routable_one_succeeds(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    exchange = await scratch.direct_exchange()
    queue = await scratch.quorum_queue()
    await (await scratch.channel.get_queue(queue, ensure=False)).bind(exchange, "bound")
    publisher = await make_publisher()

    with pytest.raises(BrokerUnavailable, match="unroutable"):
        await publisher.publish(exchange, "nowhere", b"{}", message_id="lost-1")
    await publisher.publish(exchange, "bound", b"{}", message_id="kept-1")
    await scratch.wait_count(queue, 1)


async def test_returns_are_matched_to_their_own_publish(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    exchange = await scratch.direct_exchange()
    queue = await scratch.quorum_queue()
    await (await scratch.channel.get_queue(queue, ensure=False)).bind(exchange, "bound")
    publisher = await make_publisher()

    keys = ["bound" if i % 3 else "nowhere" for i in range(60)]
    results = await asyncio.gather(
        *(
            publisher.publish(exchange, key, b"{}", message_id=f"mix-{i}")
            for i, key in enumerate(keys)
        ),
        return_exceptions=True,
    )
    for key, result in zip(keys, results, strict=True):
        if key == "bound":
            assert result is None
        else:
            assert isinstance(result, BrokerUnavailable)
            assert "unroutable" in str(result)
    await scratch.wait_count(queue, keys.count("bound"))


async def test_nack_fails_the_publish(make_publisher: MakePublisher, scratch: Scratch) -> None:
    full = await scratch.classic_queue(**{"x-max-length": 0, "x-overflow": "reject-publish"})
    publisher = await make_publisher()
    with pytest.raises(BrokerUnavailable, match="nack"):
        await publisher.publish("", full, b"{}", message_id="rejected-1")
    assert publisher.ready  # a nack is per message: the channel stays usable
    good = await scratch.quorum_queue()
    await publisher.publish("", good, b"{}", message_id="fine-1")


async def test_missing_exchange_fails_and_the_channel_recovers(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher()
    missing = scratch.name("missing")

    with pytest.raises(BrokerUnavailable, match="NOT_FOUND") as raised:
        await publisher.publish(missing, "any", b"{}", message_id="nowhere-1")
    assert missing in str(raised.value)

    assert await publisher.wait_ready(5)
    await publisher.publish("", queue, b"{}", message_id="after-404")
    await scratch.wait_count(queue, 1)


# --------------------------------------------------------------------------- network faults


async def test_cut_fails_every_pending_publish_then_recovers_by_itself(
    proxy: TcpProxy, make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher(proxy.amqp_url(), confirm_timeout_s=30)
    tasks = [
        asyncio.create_task(publisher.publish("", queue, b"{}", message_id=f"cut-{i}"))
        for i in range(200)
    ]
    await until_pending(publisher, 200)

    await proxy.cut()

    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, BrokerUnavailable) for result in results), results
    await eventually(lambda: not publisher.ready)
    with pytest.raises(BrokerUnavailable, match="not connected"):
        await publisher.publish("", queue, b"{}", message_id="during-outage")

    await proxy.restore()
    assert await publisher.wait_ready(10)
    await publisher.publish("", queue, b"{}", message_id="after-restore")
    assert await scratch.count(queue) >= 1


async def test_hung_network_times_out_without_leaking_and_late_acks_are_ignored(
    proxy: TcpProxy, make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher(proxy.amqp_url(), confirm_timeout_s=0.5)
    loop = asyncio.get_running_loop()

    proxy.pause()
    started = loop.time()
    with pytest.raises(BrokerUnavailable, match="no confirm"):
        await publisher.publish("", queue, b"{}", message_id="hung-1")
    assert 0.4 < loop.time() - started < 1.5
    assert live(publisher).pending_count == 0

    # The broker gets the timed-out publish now and acks it; that ack must be ignored.
    proxy.resume()
    await publisher.publish("", queue, b"{}", message_id="after-resume")
    assert live(publisher).pending_count == 0


async def test_missed_heartbeats_drop_the_connection_and_it_comes_back(
    proxy: TcpProxy, make_publisher: MakePublisher
) -> None:
    publisher = await make_publisher(proxy.amqp_url(), heartbeat_s=1, connect_timeout_s=1.0)
    assert live(publisher)._heartbeat_s == 1  # the smaller of ours and the broker's
    proxy.pause()
    await eventually(lambda: not publisher.ready, timeout_s=5)
    with pytest.raises(BrokerUnavailable, match="heartbeat"):
        await publisher.publish("", "any", b"{}", message_id="dead-1")
    proxy.resume()
    assert await publisher.wait_ready(10)


async def test_start_with_the_broker_unreachable_connects_later(
    proxy: TcpProxy, make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    await proxy.cut()
    publisher = await make_publisher(proxy.amqp_url(), wait=False)  # must not raise
    assert not publisher.ready
    with pytest.raises(BrokerUnavailable, match="not connected"):
        await publisher.publish("", queue, b"{}", message_id="too-early")

    await proxy.restore()
    assert await publisher.wait_ready(10)
    await publisher.publish("", queue, b"{}", message_id="later")
    await scratch.wait_count(queue, 1)


async def test_bad_credentials_are_reported_and_retried(make_publisher: MakePublisher) -> None:
    url = f"amqp://guest:wrong-{uuid.uuid4().hex[:6]}@{BROKER.hostname}:{BROKER.port or 5672}/"
    publisher = await make_publisher(url, wait=False)
    assert not publisher.ready
    with pytest.raises(BrokerUnavailable, match="ACCESS_REFUSED"):
        await publisher.publish("", "any", b"{}", message_id="denied")


# --------------------------------------------------------------------------- broker signals


async def test_connection_blocked_fails_fast_and_unblocked_resumes(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher(confirm_timeout_s=5)
    conn = live(publisher)
    loop = asyncio.get_running_loop()

    # A publish already in flight when the block arrives still gets its confirm.
    in_flight = asyncio.create_task(publisher.publish("", queue, b"{}", message_id="in-flight"))
    await until_pending(publisher, 1)
    conn.data_received(pamqp.frame.marshal(spec.Connection.Blocked(reason="low on memory"), 0))
    assert not publisher.ready

    started = loop.time()
    with pytest.raises(BrokerUnavailable, match="broker blocked publishing: low on memory"):
        await publisher.publish("", queue, b"{}", message_id="refused")
    assert loop.time() - started < 0.1
    await asyncio.wait_for(in_flight, 5)

    conn.data_received(pamqp.frame.marshal(spec.Connection.Unblocked(), 0))
    assert publisher.ready
    await publisher.publish("", queue, b"{}", message_id="unblocked")
    await scratch.wait_count(queue, 2)


async def test_write_backpressure_refuses_new_publishes_until_drained(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher()
    conn = live(publisher)
    # What the transport calls when the broker stops reading and the write buffer passes 4 MiB.
    conn.pause_writing()
    assert not publisher.ready
    with pytest.raises(BrokerUnavailable, match="write buffer full"):
        await publisher.publish("", queue, b"{}", message_id="backed-up")
    conn.resume_writing()
    assert publisher.ready
    await publisher.publish("", queue, b"{}", message_id="drained")


async def test_broker_connection_close_fails_pending_and_reconnects(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher(confirm_timeout_s=30)
    conn = live(publisher)
    forced_close = spec.Connection.Close(320, "CONNECTION_FORCED - test", 0, 0)

    pending = asyncio.create_task(publisher.publish("", queue, b"{}", message_id="pending"))
    await until_pending(publisher, 1)
    conn.data_received(pamqp.frame.marshal(forced_close, 0))

    with pytest.raises(BrokerUnavailable, match="CONNECTION_FORCED"):
        await pending
    assert await publisher.wait_ready(10)
    assert live(publisher) is not conn
    await publisher.publish("", queue, b"{}", message_id="reconnected")


# --------------------------------------------------------------------------- closing


async def test_close_waits_for_in_flight_confirms(
    make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher()
    tasks = [
        asyncio.create_task(publisher.publish("", queue, b"{}", message_id=f"drain-{i}"))
        for i in range(500)
    ]
    await until_pending(publisher, 500)

    await publisher.close(10)

    assert all(task.done() for task in tasks)
    assert await asyncio.gather(*tasks) == [None] * 500
    await scratch.wait_count(queue, 500)
    assert not publisher.ready
    with pytest.raises(BrokerUnavailable, match="closed"):
        await publisher.publish("", queue, b"{}", message_id="too-late")


async def test_close_is_bounded_when_the_broker_does_not_answer(
    proxy: TcpProxy, make_publisher: MakePublisher, scratch: Scratch
) -> None:
    queue = await scratch.quorum_queue()
    publisher = await make_publisher(proxy.amqp_url(), confirm_timeout_s=30)
    loop = asyncio.get_running_loop()
    proxy.pause()
    stuck = asyncio.create_task(publisher.publish("", queue, b"{}", message_id="stuck"))
    await until_pending(publisher, 1)

    started = loop.time()
    await publisher.close(0.3)
    assert loop.time() - started < 2.0
    with pytest.raises(BrokerUnavailable, match="closed"):
        await stuck
    proxy.resume()


# --------------------------------------------------------------------------- settings


def test_url_parts_are_decoded() -> None:
    params = ConfirmedPublisher("amqp://us%40er:p%3Ass@broker.example:5673/my%2Fvhost")._params
    assert (params.user, params.password) == ("us@er", "p:ss")
    assert (params.host, params.port, params.vhost) == ("broker.example", 5673, "my/vhost")
    default = ConfirmedPublisher("amqp://broker.example")._params
    assert (default.user, default.password, default.port) == ("guest", "guest", 5672)
    assert default.vhost == "/"
    assert ConfirmedPublisher("amqp://h/")._params.vhost == "/"
    assert ConfirmedPublisher("amqp://h/%2F")._params.vhost == "/"


def test_amqps_and_node_lists_are_parsed() -> None:
    publisher = ConfirmedPublisher("amqps://u:p@broker.example/,amqp://h2:5702/v")
    first, second = publisher._nodes
    assert (first.tls, first.host, first.port, first.address) == (
        True,
        "broker.example",
        5671,
        "broker.example:5671",
    )
    assert (second.tls, second.port, second.vhost) == (False, 5702, "v")
    assert publisher._ssl_context is not None  # the system store, for the amqps:// node


def test_a_context_that_does_not_check_host_names_is_refused() -> None:
    lax = ssl.create_default_context()
    lax.check_hostname = False
    with pytest.raises(ValueError, match="host name"):
        ConfirmedPublisher("amqps://h/", ssl_context=lax)
    with pytest.raises(ValueError, match="scheme"):
        ConfirmedPublisher("http://h/")


async def test_a_node_that_does_not_answer_is_passed_over(make_publisher: MakePublisher) -> None:
    """Port 9 on loopback refuses: the publisher goes on to the next node in the list."""
    publisher = await make_publisher(f"amqp://guest:guest@127.0.0.1:9/,{AMQP_URL}")
    assert publisher._params.address == f"{BROKER.hostname}:{BROKER.port or 5672}"
    assert publisher.ready


async def test_when_no_node_answers_the_error_names_each() -> None:
    publisher = ConfirmedPublisher(
        "amqp://127.0.0.1:9/,amqp://127.0.0.1:7/", connect_timeout_s=1.0, reconnect_max_delay_s=5
    )
    await publisher.start()  # keeps trying in the background
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:9: .*127\.0\.0\.1:7: "):
        await publisher.publish("", "q", b"{}", message_id="nowhere")
    await publisher.close()


async def test_publish_before_start_is_refused() -> None:
    publisher = ConfirmedPublisher(AMQP_URL)
    with pytest.raises(BrokerUnavailable, match="not started"):
        await publisher.publish("", "q", b"{}", message_id="early")
    await publisher.close()


def test_header_table_encoding_decodes_back_exactly() -> None:
    headers: dict[str, HeaderValue] = {
        "small": 7,
        "negative": -40000,
        "big": 2**40,
        "ratio": 0.1,  # sent as a double: no single-precision rounding
        "yes": True,
        "no": False,
        "text": "voucher \u00e9\u20ac",
        "empty": "",
    }
    encoded = _encode_headers(headers)
    consumed, decoded = pamqp.decode.field_table(encoded)
    assert (consumed, decoded) == (len(encoded), headers)
    with pytest.raises(TypeError):
        _encode_headers({"bad": None})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="64-bit"):
        _encode_headers({"huge": 2**64})
