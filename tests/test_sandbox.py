"""The partner sandboxes, over real HTTP on loopback: state rules, auth, links, faults, delivery."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from sandbox.faults import Fault, Faults
from sandbox.jackpot import SignedUrlShape, State
from sandbox.server import Sandboxes, run_forever, start_sandboxes
from sandbox.timestamps import iso_z, utcnow

JACKPOT_KEY = "jackpot-test-key"
CLIENT_ID = "bridge-test"
# At least 32 bytes, so PyJWT does not warn (warnings are errors in this suite).
CLIENT_SECRET = "doshii-test-secret-0123456789-abcdef"
ACTIVATION = "/loyalty/cards/activation"
EXPIRED_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
)
UNKNOWN_VOUCHER = "00000000-0000-0000-0000-000000000000"
UNUSED_URL = "http://127.0.0.1:9/notifications/jackpot/reserve"


@pytest.fixture
async def sandboxes() -> AsyncIterator[Sandboxes]:
    async with await start_sandboxes(
        jackpot_api_key=JACKPOT_KEY, doshii_client_id=CLIENT_ID, doshii_client_secret=CLIENT_SECRET
    ) as started:
        yield started


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Receiver:
    """A stand-in for the bridge's notification endpoint: answers the statuses it is given."""

    def __init__(
        self,
        statuses: list[int],
        *,
        default: int = 200,
        on_body: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.statuses = statuses
        self.default = default
        self.on_body = on_body
        self.received: list[tuple[dict[str, Any], str | None, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append((body, request.query.get("notificationKey"), request.content_type))
        status = self.statuses.pop(0) if self.statuses else self.default
        if self.on_body is not None:
            self.on_body(body)
        return web.json_response({"ok": status == 200}, status=status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/notifications/jackpot/reserve", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/notifications/jackpot/reserve"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def jackpot_headers(key: str = JACKPOT_KEY) -> dict[str, str]:
    return {"apikey": key}


def reserve(sandboxes: Sandboxes, url: str = UNUSED_URL, **kw: Any) -> str:
    voucher = sandboxes.jackpot.reserve(notification_url=url, notification_key="key-1", **kw)
    return str(voucher["id"])


def token(*, secret: str = CLIENT_SECRET, client_id: str = CLIENT_ID, age_s: float = 0.0) -> str:
    claims = {"clientId": client_id, "timestamp": int(time.time() - age_s)}
    return jwt.encode(claims, secret, algorithm="HS256")


def doshii_headers(sandboxes: Sandboxes, request_id: str, **kw: Any) -> dict[str, str]:
    return {
        "authorization": f"Bearer {token(**kw)}",
        "doshii-location-id": sandboxes.doshii.locations[request_id],
    }


# Jackpot: auth and state rules


async def test_jackpot_routes_need_the_apikey(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes)
    base = sandboxes.jackpot_url
    for headers in ({}, jackpot_headers("wrong-key")):
        for method, path in (
            ("PUT", f"/v2/voucher/{vid}/confirm"),
            ("PUT", f"/v2/voucher/{vid}/cancel"),
            ("GET", f"/v2/vouchers/{vid}/signedurl"),
        ):
            async with http.request(method, base + path, headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["code"] == "UNAUTHORIZED"
    assert sandboxes.jackpot.vouchers[vid]["state"] == State.RESERVED
    async with http.get(
        f"{base}/v2/vouchers/{vid}/signedurl", headers=jackpot_headers()
    ) as response:
        assert response.status == 200


async def test_confirm_moves_a_reservation_to_confirmed_once(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes, value=25)
    url = f"{sandboxes.jackpot_url}/v2/voucher/{vid}/confirm"
    async with http.put(url, headers=jackpot_headers()) as response:
        assert response.status == 200
        voucher = await response.json()
    assert voucher["state"] == "CONFIRMED"
    assert voucher["id"] == vid
    assert voucher["value"] == 25
    assert "confirmDate" in voucher
    async with http.put(url, headers=jackpot_headers()) as response:
        assert response.status == 409
        assert await response.json() == {
            "code": "VOUCHER_ALREADY_CONFIRMED",
            "message": "Voucher already confirmed",
        }
    assert sandboxes.jackpot.confirm_calls[vid] == 2


@pytest.mark.parametrize(
    ("state", "code"),
    [
        ("READY", "VOUCHER_ALREADY_CONFIRMED"),
        ("SENT", "VOUCHER_ALREADY_CONFIRMED"),
        ("CANCELED", "VOUCHER_NOT_CONFIRMABLE"),
        ("EXPIRED", "VOUCHER_NOT_CONFIRMABLE"),
    ],
)
async def test_confirm_refuses_other_states(
    sandboxes: Sandboxes, http: aiohttp.ClientSession, state: str, code: str
) -> None:
    vid = reserve(sandboxes)
    sandboxes.jackpot.set_state(vid, state)
    url = f"{sandboxes.jackpot_url}/v2/voucher/{vid}/confirm"
    async with http.put(url, headers=jackpot_headers()) as response:
        assert response.status == 409
        assert (await response.json())["code"] == code
    assert sandboxes.jackpot.vouchers[vid]["state"] == state


async def test_confirm_of_an_unknown_voucher_is_404(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    url = f"{sandboxes.jackpot_url}/v2/voucher/{UNKNOWN_VOUCHER}/confirm"
    async with http.put(url, headers=jackpot_headers()) as response:
        assert response.status == 404


async def test_a_reservation_past_its_expiry_date_cannot_be_confirmed(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes)
    sandboxes.jackpot.vouchers[vid]["resaExpireDate"] = iso_z(utcnow() - timedelta(seconds=1))
    url = f"{sandboxes.jackpot_url}/v2/voucher/{vid}/confirm"
    async with http.put(url, headers=jackpot_headers()) as response:
        assert response.status == 409
        assert (await response.json())["code"] == "VOUCHER_NOT_CONFIRMABLE"
    assert sandboxes.jackpot.vouchers[vid]["state"] == "EXPIRED"


async def test_cancel_rules(sandboxes: Sandboxes, http: aiohttp.ClientSession) -> None:
    vid = reserve(sandboxes)
    url = f"{sandboxes.jackpot_url}/v2/voucher/{vid}/cancel"
    for _ in range(2):  # cancelling twice is fine
        async with http.put(url, headers=jackpot_headers()) as response:
            assert response.status == 200
            assert (await response.json())["state"] == "CANCELED"
    confirmed = reserve(sandboxes)
    sandboxes.jackpot.set_state(confirmed, "CONFIRMED")
    confirmed_url = f"{sandboxes.jackpot_url}/v2/voucher/{confirmed}/cancel"
    async with http.put(confirmed_url, headers=jackpot_headers()) as response:
        assert response.status == 409
        assert (await response.json())["code"] == "VOUCHER_NOT_CANCELABLE"
    assert sandboxes.jackpot.vouchers[confirmed]["state"] == "CONFIRMED"
    unknown = f"{sandboxes.jackpot_url}/v2/voucher/{UNKNOWN_VOUCHER}/cancel"
    async with http.put(unknown, headers=jackpot_headers()) as response:
        assert response.status == 404
    assert sandboxes.jackpot.cancel_calls[vid] == 2


# Jackpot: signed links and PDFs


@pytest.mark.parametrize("shape", ["signedUrl", "url", "bare"])
async def test_signedurl_answers_in_each_shape(
    http: aiohttp.ClientSession, shape: SignedUrlShape
) -> None:
    async with await start_sandboxes(
        jackpot_api_key=JACKPOT_KEY, signed_url_shape=shape
    ) as sandboxes:
        vid = reserve(sandboxes)
        url = f"{sandboxes.jackpot_url}/v2/vouchers/{vid}/signedurl"
        async with http.get(url, headers=jackpot_headers()) as response:
            assert response.status == 200
            body = await response.json()
        link = body if shape == "bare" else body[shape]
        assert isinstance(link, str)
        assert link.startswith(f"{sandboxes.pdf_origin}/pdf/{vid}.pdf?expires=")
        async with http.get(link) as response:
            assert response.status == 200
        unknown = f"{sandboxes.jackpot_url}/v2/vouchers/{UNKNOWN_VOUCHER}/signedurl"
        async with http.get(unknown, headers=jackpot_headers()) as response:
            assert response.status == 404


async def test_a_valid_link_serves_the_pdf(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes, coupon_id="AGYPMNVXPJ")
    async with http.get(sandboxes.jackpot.signed_url(vid)) as response:
        assert response.status == 200
        assert response.content_type == "application/pdf"
        pdf = await response.read()
    assert pdf.startswith(b"%PDF-1.4")
    assert b"AGYPMNVXPJ" in pdf
    assert 1024 < len(pdf) < 16 * 1024
    assert pdf.rstrip().endswith(b"%%EOF")
    xref_at = int(pdf.rsplit(b"startxref", 1)[1].split()[0])
    assert pdf[xref_at:].startswith(b"xref")
    assert sandboxes.jackpot.pdf_downloads[vid] == 1


async def test_an_expired_link_is_an_s3_style_403(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes)
    async with http.get(sandboxes.jackpot.signed_url(vid, expired=True)) as response:
        assert response.status == 403
        assert response.content_type == "application/xml"
        assert await response.text() == EXPIRED_XML
    assert sandboxes.jackpot.pdf_downloads[vid] == 0


async def test_a_tampered_link_is_refused(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes)
    link = sandboxes.jackpot.signed_url(vid)
    tampered_signature = link[:-1] + ("0" if link[-1] != "0" else "1")
    other_voucher = link.replace(vid, reserve(sandboxes))
    for bad in (tampered_signature, other_voucher, link.split("&signature=")[0]):
        async with http.get(bad) as response:
            assert response.status == 403
            assert response.content_type == "application/xml"
            assert "<Code>AccessDenied</Code>" in await response.text()
    async with http.get(tampered_signature) as response:
        assert "Request signature does not match" in await response.text()
    assert sum(sandboxes.jackpot.pdf_downloads.values()) == 0


# Doshii


BAD_AUTHORIZATIONS: dict[str, Callable[[], str | None]] = {
    "missing": lambda: None,
    "basic": lambda: "Basic Zm9vOmJhcg==",
    "garbage": lambda: "Bearer not-a-jwt",
    "wrong-secret": lambda: f"Bearer {token(secret='another-secret-0123456789-abcdefgh')}",
    "wrong-client": lambda: f"Bearer {token(client_id='someone-else')}",
    "too-old": lambda: f"Bearer {token(age_s=601)}",
    "future": lambda: f"Bearer {token(age_s=-120)}",
}


@pytest.mark.parametrize("kind", BAD_AUTHORIZATIONS)
async def test_doshii_refuses_bad_tokens(
    sandboxes: Sandboxes, http: aiohttp.ClientSession, kind: str
) -> None:
    authorization = BAD_AUTHORIZATIONS[kind]()
    request_id = sandboxes.doshii.create_request()
    headers = {"doshii-location-id": sandboxes.doshii.locations[request_id]}
    if authorization is not None:
        headers["authorization"] = authorization
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    async with http.get(url, headers=headers) as response:
        assert response.status == 401
        body = await response.json()
    assert body["statusCode"] == 401
    assert body["name"] == "Unauthorized"
    assert body["message"]
    async with http.put(url, headers=headers, json={"status": "cancelled"}) as response:
        assert response.status == 401
    assert sandboxes.doshii.requests[request_id]["status"] == "pending"


async def test_doshii_reads_a_request_with_a_good_token(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    assert sandboxes.doshii_url.endswith("/partner/v3")
    request_id = sandboxes.doshii.create_request("aH43yx2", amount_cents=2500)
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    async with http.get(url, headers=doshii_headers(sandboxes, request_id)) as response:
        assert response.status == 200
        record = await response.json()
    assert record["id"] == request_id
    assert record["type"] == "giftcard"
    assert record["event"] == "card_activate"
    assert record["status"] == "pending"
    assert record["amount"] == "2500"
    assert record["uri"] == url
    assert record["log"] == f"{url}/logs"
    assert "cancelledReason" not in record


async def test_doshii_accepts_a_token_signed_with_a_short_secret() -> None:
    short_secret = "doshii-test-secret-0123456789"  # 29 bytes: PyJWT warns, Doshii does not care
    async with (
        await start_sandboxes(doshii_client_id=CLIENT_ID, doshii_client_secret=short_secret) as sb,
        aiohttp.ClientSession() as http,
    ):
        request_id = sb.doshii.create_request()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signed = token(secret=short_secret)
        headers = {
            "authorization": f"Bearer {signed}",
            "doshii-location-id": sb.doshii.locations[request_id],
        }
        async with http.get(f"{sb.doshii_url}{ACTIVATION}/{request_id}", headers=headers) as r:
            assert r.status == 200


async def test_another_locations_request_is_not_found(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    request_id = sandboxes.doshii.create_request("aH43yx2")
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    for location in ("Zz99Zz9", None):
        headers = {"authorization": f"Bearer {token()}"}
        if location is not None:
            headers["doshii-location-id"] = location
        async with http.get(url, headers=headers) as response:
            assert response.status == 404
            assert (await response.json())["name"] == "NotFound"
    unknown = f"{sandboxes.doshii_url}{ACTIVATION}/1"
    async with http.get(unknown, headers=doshii_headers(sandboxes, request_id)) as response:
        assert response.status == 404


async def test_activation_needs_an_amount_then_sticks(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    request_id = sandboxes.doshii.create_request()
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    headers = doshii_headers(sandboxes, request_id)
    async with http.put(url, headers=headers, json={"status": "activated"}) as response:
        assert response.status == 400
        assert "amount" in (await response.json())["message"]
    assert sandboxes.doshii.requests[request_id]["status"] == "pending"
    update = {
        "event": "card_activate",
        "status": "activated",
        "amount": 2500,
        "expiryDate": "2019-09-27T04:58:38.485Z",
        "reference": "AGYPMNVXPJ",
    }
    async with http.put(url, headers=headers, json=update) as response:
        assert response.status == 200
        record = await response.json()
    assert record["status"] == "activated"
    assert record["amount"] == "2500"
    assert record["expiryDate"] == "2019-09-27T04:58:38.485Z"
    assert record["reference"] == "AGYPMNVXPJ"
    cancel = {"status": "cancelled", "cancelledReason": "too late"}
    async with http.put(url, headers=headers, json=cancel) as response:
        assert response.status == 409
        assert await response.json() == {
            "statusCode": 409,
            "name": "Conflict",
            "message": "Request is already activated",
        }
    assert [put["status"] for put in sandboxes.doshii.puts[request_id]] == [400, 200, 409]
    assert sandboxes.doshii.puts[request_id][1]["body"] == update
    async with http.get(f"{url}/logs", headers=headers) as response:
        logs = await response.json()
    assert [(entry["previousStatus"], entry["status"]) for entry in logs] == [
        ("pending", "activated")
    ]


async def test_cancel_of_a_pending_request(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    request_id = sandboxes.doshii.create_request()
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    body = {"status": "cancelled", "cancelledReason": "Gift card is not valid"}
    async with http.put(url, headers=doshii_headers(sandboxes, request_id), json=body) as response:
        assert response.status == 200
        record = await response.json()
    assert record["status"] == "cancelled"
    assert record["cancelledReason"] == "Gift card is not valid"
    assert "amount" not in record


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "complete", "amount": 100}, "status"),
        ({"amount": 100}, "status"),
        ({"status": ["activated"], "amount": 100}, "status"),
        ({"status": "activated", "amount": 25.5}, "amount"),
        ({"status": "activated", "amount": "25.00"}, "amount"),
        ({"status": "activated", "amount": True}, "amount"),
        ({"status": "activated", "amount": -1}, "amount"),
        ({"status": "activated", "amount": 100, "expiryDate": "next year"}, "expiryDate"),
        ({"status": "cancelled", "reference": 12}, "reference"),
        (["status", "activated"], "object"),
    ],
)
async def test_invalid_updates_are_400(
    sandboxes: Sandboxes, http: aiohttp.ClientSession, body: object, field: str
) -> None:
    request_id = sandboxes.doshii.create_request()
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    async with http.put(url, headers=doshii_headers(sandboxes, request_id), json=body) as response:
        assert response.status == 400
        assert field in (await response.json())["message"]
    assert sandboxes.doshii.requests[request_id]["status"] == "pending"


async def test_a_body_that_is_not_json_is_400(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    request_id = sandboxes.doshii.create_request()
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    headers = doshii_headers(sandboxes, request_id)
    json_headers = {**headers, "content-type": "application/json"}
    text_headers = {**headers, "content-type": "text/plain"}
    for sent_headers, data in (
        (json_headers, b"{not json"),
        (text_headers, b'{"status": "cancelled"}'),
    ):
        async with http.put(url, headers=sent_headers, data=data) as response:
            assert response.status == 400
    assert sandboxes.doshii.puts[request_id][0]["body"] == "{not json"
    assert sandboxes.doshii.requests[request_id]["status"] == "pending"


async def test_wait_for_status_wakes_on_an_update(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    request_id = sandboxes.doshii.create_request()
    waiting = asyncio.create_task(
        sandboxes.doshii.wait_for_status(request_id, "activated", timeout_s=5)
    )
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    body = {"status": "activated", "amount": "100"}
    async with http.put(url, headers=doshii_headers(sandboxes, request_id), json=body) as response:
        assert response.status == 200
    assert await asyncio.wait_for(waiting, 5) == "activated"


# Faults


async def test_a_503_twice_then_the_real_answer(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes)
    sandboxes.jackpot.faults.set("jackpot.confirm", Fault(status=503, times=2))
    url = f"{sandboxes.jackpot_url}/v2/voucher/{vid}/confirm"
    for _ in range(2):
        async with http.put(url, headers=jackpot_headers()) as response:
            assert response.status == 503
            assert await response.json() == {
                "statusCode": 503,
                "name": "ServiceUnavailable",
                "message": "injected fault",
            }
    async with http.put(url, headers=jackpot_headers()) as response:
        assert response.status == 200
    assert sandboxes.faults.calls["jackpot.confirm"] == 3
    assert sandboxes.faults.injected["jackpot.confirm"] == 2
    assert sandboxes.jackpot.confirm_calls[vid] == 1


async def test_a_429_carries_retry_after_in_whole_seconds(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    request_id = sandboxes.doshii.create_request()
    sandboxes.doshii.faults.set("doshii.get", Fault(status=429, retry_after_s=1.2))
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    async with http.get(url, headers=doshii_headers(sandboxes, request_id)) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"
        assert (await response.json())["name"] == "TooManyRequests"
    async with http.get(url, headers=doshii_headers(sandboxes, request_id)) as response:
        assert response.status == 200


async def test_a_delay_slows_the_real_answer(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    vid = reserve(sandboxes)
    sandboxes.faults.set("jackpot.signedurl", Fault(delay_s=0.3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    url = f"{sandboxes.jackpot_url}/v2/vouchers/{vid}/signedurl"
    async with http.get(url, headers=jackpot_headers()) as response:
        assert response.status == 200
    assert loop.time() - started >= 0.3
    assert sandboxes.faults.get("jackpot.signedurl") is None  # used up
    assert sandboxes.jackpot.signedurl_calls[vid] == 1


async def test_a_drop_closes_the_connection_without_an_answer(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    request_id = sandboxes.doshii.create_request()
    # aiohttp retries an idempotent request once on a dropped connection: drop until cleared.
    sandboxes.faults.set("doshii.put", Fault(drop=True, times=-1))
    url = f"{sandboxes.doshii_url}{ACTIVATION}/{request_id}"
    body = {"status": "activated", "amount": 100}
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.put(url, headers=doshii_headers(sandboxes, request_id), json=body):
            pass
    assert all(put["status"] == 0 for put in sandboxes.doshii.puts[request_id])
    assert sandboxes.doshii.requests[request_id]["status"] == "pending"
    sandboxes.faults.clear("doshii.put")
    async with http.put(url, headers=doshii_headers(sandboxes, request_id), json=body) as response:
        assert response.status == 200


async def test_a_pdf_fault_until_cleared(sandboxes: Sandboxes, http: aiohttp.ClientSession) -> None:
    vid = reserve(sandboxes)
    sandboxes.faults.set("jackpot.pdf", Fault(status=500, times=-1))
    for _ in range(3):
        async with http.get(sandboxes.jackpot.signed_url(vid)) as response:
            assert response.status == 500
    sandboxes.faults.clear()
    async with http.get(sandboxes.jackpot.signed_url(vid)) as response:
        assert response.status == 200


def test_faults_refuse_unknown_routes_and_impossible_faults() -> None:
    faults = Faults()
    with pytest.raises(ValueError, match="unknown route"):
        faults.set("jackpot.confrim", Fault(status=500))
    with pytest.raises(ValueError, match="times"):
        Fault(status=500, times=0)
    with pytest.raises(ValueError, match="status"):
        Fault(status=42)


# Notifications


async def test_notify_retries_until_the_bridge_answers_200(sandboxes: Sandboxes) -> None:
    async with Receiver([500, 500, 200]) as receiver:
        voucher = sandboxes.jackpot.reserve(
            notification_url=receiver.url, notification_key="v1.claims.mac", value=110
        )
        status = await sandboxes.jackpot.notify(voucher["id"], retry_window_s=10)
    assert status == 200
    assert [d.status for d in sandboxes.jackpot.deliveries] == [500, 500, 200]
    assert [d.attempt for d in sandboxes.jackpot.deliveries] == [1, 2, 3]
    body, key, content_type = receiver.received[-1]
    assert key == "v1.claims.mac"
    assert content_type == "application/json"
    assert body == voucher
    assert "signedUrl" not in body


async def test_notify_gives_up_after_its_retry_window(sandboxes: Sandboxes) -> None:
    async with Receiver([], default=500) as receiver:
        vid = reserve(sandboxes, receiver.url)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status = await sandboxes.jackpot.notify(vid, retry_window_s=0.5)
        elapsed_s = loop.time() - started
    assert status == 500
    assert len(sandboxes.jackpot.deliveries) >= 2
    assert all(d.status == 500 for d in sandboxes.jackpot.deliveries)
    assert 0.5 <= elapsed_s < 3


async def test_notify_to_nobody_is_status_0(sandboxes: Sandboxes) -> None:
    vid = reserve(sandboxes, UNUSED_URL)
    assert await sandboxes.jackpot.notify(vid, retry_window_s=0.3) == 0
    assert sandboxes.jackpot.deliveries[0].error is not None


async def test_ready_notification_carries_a_working_link(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    async with Receiver([]) as receiver:
        vid = reserve(sandboxes, receiver.url)
        assert await sandboxes.jackpot.notify(vid, "READY") == 200
        assert await sandboxes.jackpot.notify(vid, "READY", expired_link=True) == 200
        assert await sandboxes.jackpot.notify(vid, "READY", signed_url="https://x/y.pdf") == 200
        assert await sandboxes.jackpot.notify(vid, "CANCELED", extra={"reason": "test"}) == 200
    (fresh, _, _), (expired, _, _), (given, _, _), (canceled, _, _) = receiver.received
    assert fresh["state"] == "READY"
    assert {"signedUrl", "confirmDate", "sendDate"} <= fresh.keys()
    async with http.get(fresh["signedUrl"]) as response:
        assert response.status == 200
    async with http.get(expired["signedUrl"]) as response:
        assert response.status == 403
        assert await response.text() == EXPIRED_XML
    assert given["signedUrl"] == "https://x/y.pdf"
    assert canceled["state"] == "CANCELED"
    assert canceled["reason"] == "test"
    assert sandboxes.jackpot.vouchers[vid]["state"] == "RESERVED"  # notify never changes state


async def test_deliver_sends_ready_once_the_bridge_confirmed(
    sandboxes: Sandboxes, http: aiohttp.ClientSession
) -> None:
    confirms: list[asyncio.Task[int]] = []

    async def confirm(vid: str) -> int:
        url = f"{sandboxes.jackpot_url}/v2/voucher/{vid}/confirm"
        async with http.put(url, headers=jackpot_headers()) as response:
            return response.status

    def like_the_bridge(body: dict[str, Any]) -> None:
        # Accept the reservation, then confirm it at Jackpot from elsewhere.
        if body["state"] == "RESERVED":
            confirms.append(asyncio.create_task(confirm(body["id"])))

    async with Receiver([], on_body=like_the_bridge) as receiver:
        vid = reserve(sandboxes, receiver.url)
        outcome = await sandboxes.jackpot.deliver(vid, confirm_timeout_s=5)
    assert [await task for task in confirms] == [200]
    assert outcome.reserved_status == 200
    assert outcome.ready_status == 200
    assert outcome.state == "READY"
    assert [body["state"] for body, _, _ in receiver.received] == ["RESERVED", "READY"]


async def test_deliver_waits_for_a_confirm_unless_forced(sandboxes: Sandboxes) -> None:
    async with Receiver([]) as receiver:
        vid = reserve(sandboxes, receiver.url)
        outcome = await sandboxes.jackpot.deliver(vid, confirm_timeout_s=0.1)
        assert (outcome.reserved_status, outcome.ready_status) == (200, None)
        assert outcome.state == "RESERVED"
        forced = await sandboxes.jackpot.deliver(vid, force=True)
    assert (forced.reserved_status, forced.ready_status, forced.state) == (200, 200, "READY")
    assert [body["state"] for body, _, _ in receiver.received] == [
        "RESERVED",
        "RESERVED",
        "READY",
    ]


# run_forever and its control routes


async def test_run_forever_serves_control_routes_until_cancelled(
    http: aiohttp.ClientSession,
) -> None:
    started: asyncio.Future[Sandboxes] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        run_forever(
            "127.0.0.1",
            0,
            0,
            JACKPOT_KEY,
            CLIENT_ID,
            CLIENT_SECRET,
            on_started=started.set_result,
        )
    )
    sandboxes = await asyncio.wait_for(started, 5)
    jackpot = f"{sandboxes.jackpot_url}/_sandbox"
    doshii = sandboxes.doshii_url.removesuffix("/partner/v3") + "/_sandbox"
    try:
        async with Receiver([503]) as receiver:
            reservation = {
                "notification_url": receiver.url,
                "notification_key": "k",
                "value": 25,
                "coupon_id": "ABCDEFGHIJ",
            }
            async with http.post(f"{jackpot}/reservations", json=reservation) as response:
                assert response.status == 200
                voucher = await response.json()
            assert (voucher["state"], voucher["value"], voucher["price"]) == ("RESERVED", 25, 150)
            notify = f"{jackpot}/vouchers/{voucher['id']}/notify"
            async with http.post(notify, json={"state": "READY"}) as response:
                assert await response.json() == {"status": 200}
            assert receiver.received[-1][0]["signedUrl"]
        async with http.get(f"{jackpot}/vouchers/{voucher['id']}") as response:
            view = await response.json()
        assert [d["status"] for d in view["deliveries"]] == [503, 200]

        fault = {"route": "doshii.get", "status": 500, "times": -1}
        async with http.post(f"{jackpot}/faults", json=fault) as response:
            assert response.status == 200
        assert sandboxes.faults.get("doshii.get") is not None
        async with http.post(f"{jackpot}/faults", json={"route": "nowhere"}) as response:
            assert response.status == 400
        async with http.delete(f"{doshii}/faults") as response:
            assert response.status == 200
        assert sandboxes.faults.get("doshii.get") is None

        async with http.post(f"{doshii}/requests", json={"amount_cents": 2500}) as response:
            created = await response.json()
        assert len(created["locationId"]) == 7
        async with http.get(f"{doshii}/requests/{created['id']}") as response:
            record = await response.json()
        assert (record["status"], record["amount"], record["puts"]) == ("pending", "2500", [])
        async with http.post(f"{doshii}/requests", json={"amount_cents": "lots"}) as response:
            assert response.status == 400
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{jackpot}/faults"):
            pass


async def _start_forever() -> tuple[asyncio.Task[None], Sandboxes]:
    started: asyncio.Future[Sandboxes] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        run_forever(
            "127.0.0.1", 0, 0, JACKPOT_KEY, CLIENT_ID, CLIENT_SECRET, on_started=started.set_result
        )
    )
    return server, await asyncio.wait_for(started, 5)


async def test_run_forever_stops_on_sigterm() -> None:
    server, _ = await _start_forever()
    # Never send SIGTERM unless run_forever handles it: the default action kills the test run.
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(server, 5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_run_forever_leaves_a_callers_signal_handlers_alone() -> None:
    loop = asyncio.get_running_loop()
    caller_stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, caller_stop.set)
    try:
        server, _ = await _start_forever()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(caller_stop.wait(), 5)
        assert not server.done()
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
