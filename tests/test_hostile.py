"""Hostile input: every class is refused with a clear answer or a dead letter, nothing leaks."""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable

import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingress.app import NOTIFICATION_PATH, create_app
from ingress.doshii import DOSHII_WEBHOOK_PATH
from shared import logs
from shared.service import start_site
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.support import sales
from tests.support.pipeline import counting_server, running_pipeline
from tests.support.report import add_row
from tests.support.served import RunnerTestServer
from tests.support.vouchers import encode, key, voucher
from workers import dlq

Client = TestClient[web.Request, web.Application]
TABLE = "hostile input"
COLUMNS = ("input class", "cases tried", "outcome")
JSON = {"Content-Type": "application/json"}


async def queued(channel: AbstractChannel, names: Names) -> int:
    total = 0
    for stage in Stage:
        declared = await channel.declare_queue(names.queue(stage), passive=True)
        total += declared.declaration_result.message_count or 0
    return total


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


BODIES: dict[str, list[bytes]] = {
    "oversized body": [encode(voucher(pad="x" * size)) for size in (65 * 1024, 1024 * 1024)],
    "deeply nested JSON": [
        nested(10_000),
        b"[" * 100_000 + b"]" * 100_000,
        encode(voucher(extra=json.loads(nested(200)))),
    ],
    "invalid UTF-8": [b'{"id": "\xff\xfe"}', encode(voucher())[:-2] + b'\xc3"}'],
    "huge numbers": [
        encode(voucher(value=10**400)).replace(b'"value": 1', b'"value": 1'),
        b'{"value": 1e999999}',
        encode(voucher(value=-1)),
        encode(voucher(price=10**12)),
    ],
    "dates out of range": [
        encode(voucher(validityDate="10000-01-01T00:00:00Z")),
        encode(voucher(validityDate="0000-01-01T00:00:00Z")),
        encode(voucher(reservationDate="2017-02-30T00:00:00Z")),
        encode(voucher(resaExpireDate=1e20)),
    ],
    "not a voucher": [b"null", b"42", b'"RESERVED"', b"[]", b"{}", b""],
}


@pytest.fixture
async def client(
    broker: Names,
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
) -> Client:
    # `broker` first: set up before the app and torn down after it, so the app's own
    # declaration at start cannot bring a queue back once the namespace is deleted.
    return await aiohttp_client(RunnerTestServer(create_app(make_settings(spool_max_bytes=0))))


@pytest.mark.parametrize("input_class", list(BODIES))
async def test_hostile_bodies_get_a_clear_4xx_and_nothing_is_published(
    client: Client, channel: AbstractChannel, broker: Names, input_class: str
) -> None:
    statuses = []
    for body in BODIES[input_class]:
        response = await client.post(
            NOTIFICATION_PATH,
            data=io.BytesIO(body),
            params={"notificationKey": key()},
            headers=JSON,
        )
        answer = await response.json()
        assert 400 <= response.status < 500, (input_class, body[:80], response.status)
        assert answer["error"]
        assert answer["detail"]
        statuses.append(response.status)
    assert await queued(channel, broker) == 0
    add_row(
        TABLE, COLUMNS, (input_class, len(statuses), f"{sorted(set(statuses))}, none published")
    )


async def test_wrong_content_types_are_415(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    types = ["text/plain", "application/xml", "multipart/form-data; boundary=x", "", "json"]
    for content_type in types:
        response = await client.post(
            NOTIFICATION_PATH,
            data=encode(voucher()),
            params={"notificationKey": key()},
            headers={"Content-Type": content_type},
        )
        assert response.status == 415
    assert await queued(channel, broker) == 0
    add_row(TABLE, COLUMNS, ("wrong content type", len(types), "[415], none published"))


def forged_keys() -> list[str]:
    real = key(request="req-1", amount_cents=11000)
    other = key(request="req-2", amount_cents=99)
    version, claims, mac = real.split(".")
    _, other_claims, other_mac = other.split(".")
    return [
        f"{version}.{other_claims}.{mac}",  # claims of another request, this MAC
        f"{version}.{claims}.{other_mac}",  # this request, another's MAC
        real[: len(real) // 2],  # truncated
        real[:-1],
        f"{version}.{claims}",
        f"{version}.{claims}.{'A' * 22}",
        "v1..",
        "v1." + "A" * 2000 + ".x",
        real.replace("v1", "v0", 1),
        real + "A",
    ]


async def test_forged_replayed_and_truncated_keys_are_403(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    keys = forged_keys()
    for forged in keys:
        response = await client.post(
            NOTIFICATION_PATH,
            data=encode(voucher()),
            params={"notificationKey": forged},
            headers=JSON,
        )
        assert response.status == 403, forged
    assert await queued(channel, broker) == 0
    add_row(
        TABLE, COLUMNS, ("forged, swapped or truncated keys", len(keys), "[403], none published")
    )


async def test_hostile_pdf_links_are_dead_lettered_and_nothing_forbidden_is_fetched(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    forbidden, forbidden_origin, forbidden_hits = await counting_server()
    redirector_hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        redirector_hits.append(request.path)
        if request.path == "/redirect":
            raise web.HTTPFound(f"{forbidden_origin}/stolen.pdf")
        if request.path == "/not-a-pdf":
            return web.Response(body=b"<html>hello</html>", content_type="text/html")
        return web.Response(body=b"%PDF-1.4" + b"0" * 4096, content_type="application/pdf")

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    allowed, allowed_port = await start_site(app, "127.0.0.1", 0, shutdown_timeout_s=1)
    allowed_origin = f"http://127.0.0.1:{allowed_port}"
    cases = {
        f"{forbidden_origin}/voucher.pdf": "PDF host not allowed",
        "http://169.254.169.254/latest/meta-data/iam": "PDF host not allowed",
        "https://10.0.0.8/voucher.pdf": "PDF host not allowed",
        "https://192.168.1.20/voucher.pdf": "PDF host not allowed",
        "file:///etc/passwd": "forbidden scheme",
        f"{allowed_origin}/redirect": "PDF host not allowed",
        f"{allowed_origin}/not-a-pdf": "not a PDF",
        f"{allowed_origin}/too-big.pdf": "cap",
    }
    try:
        async with running_pipeline(
            make_settings, pdf_max_bytes=1024, extra_pdf_hosts=[allowed_origin]
        ) as pipeline:
            stories = {}
            for url in cases:
                story = pipeline.new_voucher()
                stories[story.voucher_id] = url
                await pipeline.sandboxes.jackpot.deliver(story.voucher_id, signed_url=url)
            await pipeline.settled(channel)
            letters = {
                letter.voucher_id: letter for letter in await dlq.list_dead(pipeline.settings)
            }
    finally:
        await forbidden.cleanup()
        await allowed.cleanup()
    for voucher_id, url in stories.items():
        assert voucher_id in letters, url
        assert cases[url] in letters[voucher_id].reason, (url, letters[voucher_id].reason)
        assert "?" not in letters[voucher_id].reason
    assert forbidden_hits == []
    assert sorted(redirector_hits) == ["/not-a-pdf", "/redirect", "/too-big.pdf"]
    add_row(
        TABLE,
        COLUMNS,
        (
            "hostile signedUrl (private, metadata, file://, redirect, non-PDF, oversize)",
            len(cases),
            "dead-lettered with reason, forbidden hosts never contacted",
        ),
    )


async def test_no_secret_key_or_signed_link_reaches_the_logs(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    stream = io.StringIO()
    logs.configure("debug", json=True, stream=stream, cache=False)
    try:
        async with running_pipeline(make_settings) as pipeline:
            stories = [pipeline.new_voucher() for _ in range(3)]
            await pipeline.sandboxes.jackpot.deliver(stories[0].voucher_id)
            await pipeline.sandboxes.jackpot.deliver(stories[1].voucher_id, expired_link=True)
            await pipeline.sandboxes.jackpot.notify(stories[2].voucher_id, "RESERVED")
            await pipeline.doshii_status(stories[0], "activated")
            await pipeline.doshii_status(stories[1], "activated")
            await pipeline.settled(channel)
            settings = pipeline.settings
    finally:
        logs.configure("info", cache=False)
    captured = stream.getvalue()
    assert '"event":"notification"' in captured
    secrets = [s.key for s in stories]
    secrets += [s.get_secret_value() for s in settings.key_secrets]
    secrets += [settings.jackpot_api_key.get_secret_value()]
    secrets += [settings.doshii_client_secret.get_secret_value()]
    for secret in secrets:
        assert secret not in captured
    assert "signature=" not in captured
    assert "Bearer" not in captured
    add_row(TABLE, COLUMNS, ("secrets, keys, signed links in logs", len(secrets) + 2, "none found"))


def _sale(**fields: object) -> bytes:
    return sales.encode(sales.card_activate(**fields))  # type: ignore[arg-type]


WEBHOOK_BODIES: dict[str, list[bytes]] = {
    "webhook: oversized body": [_sale(pad="x" * 65 * 1024), _sale(pad="x" * 1024 * 1024)],
    "webhook: deeply nested JSON": [
        nested(10_000),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"event": "card_activate", "data": ' + nested(5_000) + b"}",
    ],
    "webhook: invalid UTF-8": [b'{"event": "card_activate\xff"}', _sale()[:-2] + b'\xc3"}'],
    "webhook: hostile amounts": [
        _sale(amount="9" * 5000),
        _sale(amount=10**400),
        _sale(amount="1e3"),
        _sale(amount=" 2500"),
        _sale(amount="\uff12\uff15\uff10\uff10"),  # fullwidth digits
        _sale(amount=None),
    ],
    "webhook: hostile ids": [
        _sale(request_id="../../../webhooks"),
        _sale(request_id="1354?x=1"),
        _sale(request_id="x" * 10_000),
        _sale(request_id="\uff11\uff13\uff15\uff14"),
        _sale(location_id="aH43yx2\r\nX-Injected: 1"),
    ],
    "webhook: not an event": [b"null", b"42", b'"card_activate"', b"[]", b'{"event": []}'],
}


@pytest.fixture
async def webhook_client(
    broker: Names,
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
) -> Client:
    # `broker` first, as for `client`.
    settings = make_settings(spool_max_bytes=0, doshii_webhook_auth=sales.WEBHOOK_AUTH)
    return await aiohttp_client(RunnerTestServer(create_app(settings)))


@pytest.mark.parametrize("input_class", list(WEBHOOK_BODIES))
async def test_hostile_webhooks_get_a_clear_4xx_and_nothing_is_published(
    webhook_client: Client, channel: AbstractChannel, broker: Names, input_class: str
) -> None:
    statuses = []
    for body in WEBHOOK_BODIES[input_class]:
        response = await webhook_client.post(
            DOSHII_WEBHOOK_PATH, data=io.BytesIO(body), headers=sales.basic()
        )
        answer = await response.json()
        assert 400 <= response.status < 500, (input_class, body[:80], response.status)
        assert answer["error"]
        assert answer["detail"]
        statuses.append(response.status)
    assert await queued(channel, broker) == 0
    add_row(
        TABLE, COLUMNS, (input_class, len(statuses), f"{sorted(set(statuses))}, none published")
    )


async def test_forged_webhook_credentials_are_401(
    webhook_client: Client, channel: AbstractChannel, broker: Names
) -> None:
    good = sales.basic()["Authorization"]
    forged = [
        sales.basic(sales.WEBHOOK_KEY, sales.WEBHOOK_TOKEN[:-1]),
        sales.basic(sales.WEBHOOK_KEY, sales.WEBHOOK_TOKEN + "x"),
        sales.basic(sales.WEBHOOK_KEY.upper(), sales.WEBHOOK_TOKEN),
        sales.basic(sales.WEBHOOK_KEY, sales.OLD_WEBHOOK_TOKEN),
        sales.basic("", ""),
        {"Authorization": good.lower()},
        {"Authorization": good + "=="},
        {"Authorization": "Basic " + "\u00e9" * 20},
        {"Authorization": "Digest username=doshii"},
        {},
    ]
    for headers in forged:
        response = await webhook_client.post(
            DOSHII_WEBHOOK_PATH,
            data=_sale(),
            headers={"Content-Type": "application/json", **headers},
        )
        assert response.status == 401, headers
        assert "WWW-Authenticate" in response.headers
    assert await queued(channel, broker) == 0
    add_row(
        TABLE,
        COLUMNS,
        ("webhook: forged or altered Basic credentials", len(forged), "[401], none published"),
    )
