"""The ingress against the real broker: every row of the answer table, and what is queued."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingress.app import MAX_BODY_BYTES, NOTIFICATION_PATH, Handler, create_app
from shared import envelope, logs, topology
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.support.served import RunnerTestServer
from tests.support.tcpproxy import TcpProxy
from tests.support.vouchers import encode, key, voucher

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def make_client(
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    broker: Names,
) -> MakeClient:
    async def make(**overrides: Any) -> Client:
        settings = make_settings(**overrides)
        return await aiohttp_client(RunnerTestServer(create_app(settings)))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    client = await make_client(spool_max_bytes=0)
    await _wait_ready(client)
    return client


async def _wait_ready(client: Client, timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        # Readiness is only observable over HTTP, so poll it, bounded by the timeout.
        while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


async def post(client: Client, body: bytes, notification_key: str | None = None, **kw: Any) -> Any:
    params = {} if notification_key is None else {"notificationKey": notification_key}
    headers = kw.pop("headers", JSON)
    return await client.post(NOTIFICATION_PATH, data=body, params=params, headers=headers, **kw)


async def take(channel: AbstractChannel, queue: str) -> AbstractIncomingMessage | None:
    q = await channel.get_queue(queue, ensure=False)
    return await q.get(no_ack=True, fail=False)


async def depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    count = declared.declaration_result.message_count
    assert count is not None
    return count


async def total_depth(channel: AbstractChannel, names: Names) -> int:
    return sum([await depth(channel, names.queue(stage)) for stage in Stage])


async def test_valid_notification_is_confirmed_then_answered(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    # Odd spacing, unicode and an unknown field: the queued body must be the posted bytes.
    body = voucher(partnerNote="café ☕")
    raw = json.dumps(body, indent=3, ensure_ascii=False).encode()
    response = await post(client, raw, key(request="req-42", amount_cents=11000))

    assert response.status == 200
    answer = await response.json()
    assert answer == {"status": "accepted", "messageId": f"{body['id']}:RESERVED"}
    message = await take(channel, broker.queue(Stage.RESERVATIONS))
    assert message is not None
    assert message.body == raw
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == f"{body['id']}:RESERVED"
    assert message.correlation_id == body["id"]
    headers = message.headers
    assert headers[envelope.REQUEST] == "req-42"
    assert headers[envelope.LOCATION] == "aH43yx2"
    assert headers[envelope.AMOUNT_CENTS] == 11000
    assert isinstance(headers[envelope.RECEIVED_MS], int)


@pytest.mark.parametrize(
    ("state", "stage"),
    [
        ("RESERVED", Stage.RESERVATIONS),
        ("READY", Stage.PDFS),
        ("CANCELED", Stage.LIFECYCLE),
        ("EXPIRED", Stage.LIFECYCLE),
        ("SOMETHING_NEW", Stage.LIFECYCLE),
    ],
)
async def test_routing_by_state(
    client: Client, channel: AbstractChannel, broker: Names, state: str, stage: Stage
) -> None:
    body = voucher(state)
    response = await post(client, encode(body), key())
    assert response.status == 200
    assert await depth(channel, broker.queue(stage)) == 1
    assert await total_depth(channel, broker) == 1


@pytest.mark.parametrize(
    "notification_key",
    [
        None,
        "",
        "not-a-key",
        key().replace("v1.", "v2.", 1),
        key()[:-1],
        key(request="other").split(".")[0] + "." + key(request="other").split(".")[1] + ".AAAA",
    ],
)
async def test_bad_key_is_forbidden_and_not_published(
    client: Client, channel: AbstractChannel, broker: Names, notification_key: str | None
) -> None:
    response = await post(client, encode(voucher()), notification_key)
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"
    assert await total_depth(channel, broker) == 0


async def test_claims_swapped_between_keys_are_forbidden(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    _, claims_a, _ = key(request="a").split(".")
    _, _, mac_b = key(request="b").split(".")
    response = await post(client, encode(voucher()), f"v1.{claims_a}.{mac_b}")
    assert response.status == 403
    assert await total_depth(channel, broker) == 0


@pytest.mark.parametrize(
    ("body", "error", "field"),
    [
        (b"{not json", "invalid_json", None),
        (b"\xff\xfe garbage", "invalid_json", None),
        (b"[1, 2]", "invalid_voucher", None),
        (
            encode({k: v for k, v in voucher().items() if k != "couponId"}),
            "invalid_voucher",
            "couponId",
        ),
        (encode(voucher(value="lots")), "invalid_voucher", "value"),
        (encode(voucher(id="not-a-uuid")), "invalid_voucher", "id"),
        (encode(voucher(validityDate="2018-13-45")), "invalid_voucher", "validityDate"),
        (encode(voucher(value=10**30)), "invalid_voucher", "value"),
    ],
)
async def test_bad_body_is_400_naming_the_field(
    client: Client,
    channel: AbstractChannel,
    broker: Names,
    body: bytes,
    error: str,
    field: str | None,
) -> None:
    response = await post(client, body, key())
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == error
    if field is not None:
        assert field in [problem["field"] for problem in answer["detail"]]
    assert await total_depth(channel, broker) == 0


async def test_body_over_64_kib_is_413(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    body = encode(voucher(padding="x" * MAX_BODY_BYTES))
    response = await post(client, body, key())
    assert response.status == 413
    assert (await response.json())["error"] == "payload_too_large"
    assert await total_depth(channel, broker) == 0


async def test_chunked_body_over_64_kib_is_413(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 4096
        yield encode(voucher())

    response = await client.post(
        NOTIFICATION_PATH, data=chunks(), params={"notificationKey": key()}, headers=JSON
    )
    assert response.status == 413
    assert await total_depth(channel, broker) == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(
    client: Client, channel: AbstractChannel, broker: Names, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await post(client, encode(voucher()), key(), headers=headers)
    assert response.status == 415
    assert await total_depth(channel, broker) == 0


async def test_unroutable_publish_is_503(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    queue = await channel.get_queue(broker.queue(Stage.RESERVATIONS), ensure=False)
    await queue.unbind(broker.events, routing_key="voucher.reserved")
    response = await post(client, encode(voucher()), key())
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert "unroutable" in (await response.json())["detail"]


async def test_nacked_publish_is_503(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    # A second queue on the same route that refuses everything makes the broker nack the publish.
    # (It never gets a consumer, so auto-delete would never remove it: the test deletes it.)
    refusing = await channel.declare_queue(
        f"{broker.namespace}.refusing",
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    try:
        await refusing.bind(broker.events, routing_key="voucher.reserved")
        response = await post(client, encode(voucher()), key())
        assert response.status == 503
        assert response.headers["Retry-After"]
    finally:
        await refusing.delete(if_unused=False, if_empty=False)


async def test_lost_broker_gives_503_never_200_and_recovers(
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    channel: AbstractChannel,
    broker: Names,
) -> None:
    from urllib.parse import urlsplit

    from tests.conftest import AMQP_URL

    target = urlsplit(AMQP_URL)
    async with TcpProxy(target.hostname or "127.0.0.1", target.port or 5672) as proxy:
        settings = make_settings(amqp_url=proxy.amqp_url(), spool_max_bytes=0)
        client = await aiohttp_client(RunnerTestServer(create_app(settings)))
        await _wait_ready(client)
        assert (await post(client, encode(voucher()), key())).status == 200

        await proxy.cut()
        statuses = [(await post(client, encode(voucher()), key())).status for _ in range(5)]
        assert statuses == [503] * 5
        assert (await client.get("/readyz")).status == 503

        await proxy.restore()
        await _wait_ready(client)
        assert (await post(client, encode(voucher()), key())).status == 200
    assert await depth(channel, broker.queue(Stage.RESERVATIONS)) == 2


async def test_no_confirm_in_time_is_503(
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    broker: Names,
) -> None:
    from urllib.parse import urlsplit

    from tests.conftest import AMQP_URL

    target = urlsplit(AMQP_URL)
    async with TcpProxy(target.hostname or "127.0.0.1", target.port or 5672) as proxy:
        settings = make_settings(
            amqp_url=proxy.amqp_url(), spool_max_bytes=0, publish_timeout_s=0.5
        )
        client = await aiohttp_client(RunnerTestServer(create_app(settings)))
        await _wait_ready(client)
        proxy.pause()
        response = await post(client, encode(voucher()), key())
        assert response.status == 503
        assert "confirm" in (await response.json())["detail"]
        proxy.resume()


async def test_health_ready_metrics_and_openapi(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"
    await post(client, encode(voucher()), key())
    await post(client, encode(voucher()), "bad")
    text = await (await client.get("/metrics")).text()
    assert 'bridge_ingress_requests_total{outcome="accepted"}' in text
    assert 'bridge_ingress_requests_total{outcome="forbidden"}' in text
    assert "bridge_ingress_publish_seconds_bucket" in text
    document = await (await client.get("/openapi.json")).json()
    assert set(document["paths"]) == {
        NOTIFICATION_PATH,
        "/notifications/doshii",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }


async def test_one_log_line_per_notification_without_key_or_link(
    client: Client, broker: Names
) -> None:
    stream = io.StringIO()
    logs.configure("info", json=True, stream=stream, cache=False)
    secret_key = key()
    body = voucher("READY")
    await post(client, encode(body), secret_key)
    await post(client, encode(voucher()), "forged-key")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    notifications = [line for line in lines if line["event"] == "notification"]
    assert [n["outcome"] for n in notifications] == ["accepted", "forbidden"]
    first = notifications[0]
    assert first["voucher_id"] == body["id"]
    assert first["coupon_id"] == body["couponId"]
    assert first["state"] == "READY"
    assert first["duration_ms"] >= 0
    captured = stream.getvalue()
    assert secret_key not in captured
    assert "forged-key" not in captured
    assert "X-Amz-Signature" not in captured


async def test_the_ingress_declares_the_topology_itself(
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    channel: AbstractChannel,
) -> None:
    # No broker fixture here: nothing is declared until the ingress does it, so an
    # unroutable publish (503) would show that it did not.
    settings = make_settings(spool_max_bytes=0)
    try:
        client = await aiohttp_client(RunnerTestServer(create_app(settings)))
        await _wait_ready(client)
        assert (await post(client, encode(voucher()), key())).status == 200
        # Declaring again over what the ingress declared is harmless.
        names = await topology.declare(
            channel,
            settings.namespace,
            tiers_s=settings.retry_tiers_s,
            delivery_limit=settings.delivery_limit,
        )
        assert await depth(channel, names.queue(Stage.RESERVATIONS)) == 1
    finally:
        await topology.delete(channel, settings.namespace, tiers_s=settings.retry_tiers_s)


async def test_the_notification_post_skips_the_router_and_both_paths_answer_alike(
    aiohttp_client: Callable[[web.Application | RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    broker: Names,
) -> None:
    routed: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        routed.append(f"{request.method} {request.path}")
        return await handler(request)

    def app() -> web.Application:
        application = create_app(make_settings(spool_max_bytes=0))
        application.middlewares.append(record)
        return application

    fast = await aiohttp_client(RunnerTestServer(app()))
    plain = await aiohttp_client(app())  # aiohttp's own runner: everything is routed
    for client in (fast, plain):
        await _wait_ready(client)
    answers = []
    for client in (fast, plain):
        accepted = await post(client, encode(voucher()), key())
        forbidden = await post(client, encode(voucher()), "forged-key")
        wrong_method = await client.get(NOTIFICATION_PATH)
        answers.append(
            [
                (accepted.status, (await accepted.json())["status"]),
                (forbidden.status, (await forbidden.json())["error"]),
                (wrong_method.status, (await wrong_method.json())["error"]),
            ]
        )
    assert (
        answers[0]
        == answers[1]
        == [
            (200, "accepted"),
            (403, "forbidden"),
            (405, "method_not_allowed"),
        ]
    )
    # Through the ingress's runner only the GET went through the application; the plain
    # runner routed all three.
    assert routed.count(f"POST {NOTIFICATION_PATH}") == 2
    assert routed.count(f"GET {NOTIFICATION_PATH}") == 2
