"""The till's side of the sandboxes, over real HTTP on loopback, and the Jackpot session client.

Jackpot: one-time JWTs, sessions that reserve once, the catalogue, stock, and the notifications
it sends by itself. Doshii: webhooks registered and delivered with Basic auth, retried. The
bridge's `JackpotSessions` client against the Jackpot sandbox, and a till sale reaching the
real ingress and the intake queue.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestClient

from bridge.cli import main as bridge_main
from ingress.app import create_app
from ingress.doshii import DOSHII_WEBHOOK_PATH
from sandbox.catalogue import DEFAULT_OFFER_ID, DEFAULT_STORE_ID
from sandbox.doshii import CARD_ACTIVATE, Webhook
from sandbox.faults import Fault
from sandbox.jackpot import JWT_BEARER_GRANT, State
from sandbox.server import Sandboxes, start_sandboxes
from shared.errors import TransientError
from shared.intake import IntakeRequest
from shared.partners import JackpotSessions, ReservationUnreadable, SessionEnded, SessionRefused
from shared.reserve import JackpotRefusal, RefusalKind
from shared.settings import ENV_PREFIX, ConfirmMode, JackpotOffer, ReserveBy, Settings
from shared.topology import Names, Stage
from tests.support import sales
from tests.support.served import RunnerTestServer

SIGNATURE = "jackpot-test-api-signature-0123456789"
CLIENT_ID = "bridge-test-client"
OFFER = JackpotOffer(DEFAULT_STORE_ID, DEFAULT_OFFER_ID)
Client = TestClient[web.Request, web.Application]
REPO_ROOT = Path(__file__).parents[1]


class Receiver:
    """A stand-in for the bridge: records each POST, answers the statuses it is given."""

    def __init__(self, statuses: list[int] | None = None, *, default: int = 200) -> None:
        self.statuses = list(statuses or [])
        self.default = default
        self.received: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.url = ""
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append((request.path_qs, body, dict(request.headers)))
        self.arrived.set()
        status = self.statuses.pop(0) if self.statuses else self.default
        return web.json_response({"ok": status == 200}, status=status)

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def sandboxes() -> AsyncIterator[Sandboxes]:
    async with await start_sandboxes(
        jackpot_api_signature=SIGNATURE,
        jackpot_client_id=CLIENT_ID,
        webhook_first_backoff_s=0.01,
    ) as started:
        started.jackpot.notify_attempts = 3
        yield started


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        yield session


def client(
    http: aiohttp.ClientSession,
    sandboxes: Sandboxes,
    *,
    reserve_by: ReserveBy = ReserveBy.VALUE,
    confirm: ConfirmMode = ConfirmMode.API,
) -> JackpotSessions:
    return JackpotSessions(
        http,
        sandboxes.jackpot_url,
        client_id=CLIENT_ID,
        api_signature=SIGNATURE,
        reserve_by=reserve_by,
        confirm=confirm,
    )


def assertion(**claims: Any) -> str:
    values: dict[str, Any] = {"amount": 25, "iat": int(time.time()), "notificationKey": "key-1"}
    values.update(claims)
    return jwt.encode(values, SIGNATURE, algorithm="HS256")


async def token_post(http: aiohttp.ClientSession, sandboxes: Sandboxes, **body: Any) -> Any:
    values = {"grant_type": JWT_BEARER_GRANT, "client_id": CLIENT_ID, "assertion": assertion()}
    values.update(body)
    async with http.post(f"{sandboxes.jackpot_url}/v2/token", json=values) as response:
        return response.status, await response.json()


# Jackpot: tokens and sessions


async def test_a_signed_jwt_opens_one_session_and_never_a_second(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    signed = assertion()
    status, answer = await token_post(http, sandboxes, assertion=signed)
    assert status == 200
    assert answer["token_type"] == "Bearer"
    assert isinstance(answer["access_token"], str)
    status, answer = await token_post(http, sandboxes, assertion=signed)
    assert status == 400
    assert answer == {"error": "invalid_grant", "error_description": "assertion already used"}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"assertion": jwt.encode({"amount": 1, "iat": 1}, "x" * 32)}, 400, "invalid_grant"),
        ({"assertion": assertion(iat=int(time.time()) - 3600)}, 400, "invalid_grant"),
        ({"assertion": assertion(amount=0)}, 400, "invalid_grant"),
        ({"assertion": assertion(notificationKey="")}, 400, "invalid_grant"),
        ({"assertion": jwt.encode({"iat": int(time.time())}, SIGNATURE)}, 400, "invalid_grant"),
        ({"client_id": "someone-else"}, 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        ({"assertion": None}, 400, "invalid_request"),
    ],
    ids=["signature", "old", "amount", "key", "claims", "client", "grant", "no-assertion"],
)
async def test_bad_token_requests_are_refused(
    http: aiohttp.ClientSession, sandboxes: Sandboxes, body: dict[str, Any], status: int, error: str
) -> None:
    answer_status, answer = await token_post(http, sandboxes, **body)
    assert (answer_status, answer["error"]) == (status, error)
    assert sandboxes.jackpot.sessions == {}


@pytest.mark.parametrize("field", ["access_token", "accessToken", "token"])
async def test_the_client_reads_every_token_shape(
    http: aiohttp.ClientSession, sandboxes: Sandboxes, field: Any
) -> None:
    sandboxes.jackpot.token_field = field
    jackpot = client(http, sandboxes)
    token = await jackpot.open_session(jackpot.assertion(amount_cents=2500, notification_key="k"))
    assert token in sandboxes.jackpot.sessions


async def test_a_session_reserves_once_and_the_client_says_so(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    jackpot = client(http, sandboxes)
    signed = jackpot.assertion(amount_cents=2500, notification_key="v1.key")
    token = await jackpot.open_session(signed)
    voucher = await jackpot.reserve(token, offer=OFFER, amount_cents=2500)
    assert voucher.state == State.RESERVED
    assert (voucher.value, voucher.price) == (Decimal(25), Decimal(25))
    assert sandboxes.jackpot.vouchers[str(voucher.id)]["state"] == State.RESERVED
    with pytest.raises(SessionEnded):
        await jackpot.reserve(token, offer=OFFER, amount_cents=2500)
    with pytest.raises(SessionRefused) as refused:
        await jackpot.open_session(signed)
    assert refused.value.assertion_used
    assert len(sandboxes.jackpot.vouchers) == 1


async def test_a_session_ends_after_its_hour(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    sandboxes.jackpot.session_ttl_s = 0.0
    jackpot = client(http, sandboxes)
    token = await jackpot.open_session(jackpot.assertion(amount_cents=2500, notification_key="k"))
    with pytest.raises(SessionEnded):
        await jackpot.reserve(token, offer=OFFER, amount_cents=2500)
    assert sandboxes.jackpot.vouchers == {}


async def test_the_catalogue_takes_an_apikey_or_a_session(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    base = sandboxes.jackpot_url
    apikey = {"apikey": sandboxes.jackpot.api_key}
    jackpot = client(http, sandboxes)
    token = await jackpot.open_session(jackpot.assertion(amount_cents=2500, notification_key="k"))
    bearer = {"Authorization": f"Bearer {token}"}
    for headers in (apikey, bearer):
        async with http.get(f"{base}/v2/stores", headers=headers) as r:
            assert r.status == 200
            assert [store["id"] for store in await r.json()] == [DEFAULT_STORE_ID]
        async with http.get(f"{base}/v2/stores/proposed-vouchers", headers=headers) as r:
            assert DEFAULT_OFFER_ID in [offer["id"] for offer in await r.json()]
        path = f"/v2/stores/{DEFAULT_STORE_ID}/proposed-vouchers"
        async with http.get(f"{base}{path}", headers=headers) as r:
            assert r.status == 200
        path = f"/v2/stores/{DEFAULT_STORE_ID}/offers/{DEFAULT_OFFER_ID}"
        async with http.get(f"{base}{path}", headers=headers) as r:
            assert (await r.json())["stock"] > 0
    async with http.get(f"{base}/v2/stores") as r:
        assert r.status == 401
    async with http.get(f"{base}/v2/stores/nowhere/offers/x", headers=apikey) as r:
        assert r.status == 404


# Jackpot: reserving, refusals and stock, through the bridge's client


async def _reserve(jackpot: JackpotSessions, amount_cents: int, offer: JackpotOffer = OFFER) -> Any:
    signed = jackpot.assertion(amount_cents=amount_cents, notification_key=f"k-{time.time_ns()}")
    return await jackpot.reserve(
        await jackpot.open_session(signed), offer=offer, amount_cents=amount_cents
    )


async def test_reserve_by_price_buys_the_most_value_the_budget_allows(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    jackpot = client(http, sandboxes, reserve_by=ReserveBy.PRICE)
    voucher = await _reserve(jackpot, 4500, JackpotOffer(DEFAULT_STORE_ID, "gift-card-50"))
    assert (voucher.value, voucher.price) == (Decimal(50), Decimal(45))


@pytest.mark.parametrize(
    ("amount_cents", "offer", "kind", "status"),
    [
        (300, OFFER, RefusalKind.AMOUNT_NOT_ALLOWED, 400),
        (2550, OFFER, RefusalKind.AMOUNT_NOT_ALLOWED, 400),
        (2500, JackpotOffer(DEFAULT_STORE_ID, "no-such-offer"), RefusalKind.NO_SUCH_OFFER, 404),
        (2500, JackpotOffer("no-such-store", DEFAULT_OFFER_ID), RefusalKind.NO_SUCH_OFFER, 404),
    ],
)
async def test_refusals_carry_the_reason_the_till_shows(
    http: aiohttp.ClientSession,
    sandboxes: Sandboxes,
    amount_cents: int,
    offer: JackpotOffer,
    kind: RefusalKind,
    status: int,
) -> None:
    with pytest.raises(JackpotRefusal) as refused:
        await _reserve(client(http, sandboxes), amount_cents, offer)
    assert (refused.value.kind, refused.value.status) == (kind, status)
    cents = f"{amount_cents // 100}.{amount_cents % 100:02d}"
    assert refused.value.reason.startswith(f"No voucher available for {cents}: ")
    assert sandboxes.jackpot.vouchers == {}


async def test_stock_runs_out_and_a_cancel_brings_it_back(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    sandboxes.jackpot.catalogue[DEFAULT_STORE_ID].offers[DEFAULT_OFFER_ID].stock = 1
    jackpot = client(http, sandboxes)
    first = await _reserve(jackpot, 2500)
    with pytest.raises(JackpotRefusal) as refused:
        await _reserve(jackpot, 2500)
    assert refused.value.kind == RefusalKind.OUT_OF_STOCK
    assert refused.value.reason == "No voucher available for 25.00: out of stock"
    url = f"{sandboxes.jackpot_url}/v2/voucher/{first.id}/cancel"
    async with http.put(url, headers={"apikey": sandboxes.jackpot.api_key}) as r:
        assert r.status == 200
    assert (await _reserve(jackpot, 2500)).state == State.RESERVED


async def test_transient_failures_are_transient(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    jackpot = client(http, sandboxes)
    sandboxes.faults.set("jackpot.token", Fault(status=503))
    with pytest.raises(TransientError):
        await _reserve(jackpot, 2500)
    sandboxes.faults.set("jackpot.reserve", Fault(status=429, retry_after_s=7))
    with pytest.raises(TransientError) as limited:
        await _reserve(jackpot, 2500)
    assert limited.value.retry_after_s == 7
    sandboxes.faults.set("jackpot.reserve", Fault(delay_s=3))  # past the 2 s client timeout
    with pytest.raises(TransientError):
        await _reserve(jackpot, 2500)
    sandboxes.faults.set("jackpot.reserve", Fault(drop=True))
    with pytest.raises(TransientError):
        await _reserve(jackpot, 2500)


async def test_a_yes_without_a_voucher_is_unreadable(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    sandboxes.faults.set("jackpot.reserve", Fault(status=200))
    with pytest.raises(ReservationUnreadable):
        await _reserve(client(http, sandboxes), 2500)


# Jackpot: the notifications it sends by itself


async def test_reserved_then_ready_after_the_confirm_with_the_jwts_key(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    async with Receiver() as bridge:
        sandboxes.jackpot.reserve_notification_url = f"{bridge.url}/notify"
        jackpot = client(http, sandboxes, confirm=ConfirmMode.API)
        signed = jackpot.assertion(amount_cents=2500, notification_key="v1.our-key")
        voucher = await jackpot.reserve(
            await jackpot.open_session(signed), offer=OFFER, amount_cents=2500
        )
        await bridge.wait_for(1)
        path, body, _ = bridge.received[0]
        assert path == "/notify?notificationKey=v1.our-key"
        assert (body["id"], body["state"]) == (str(voucher.id), "RESERVED")
        await sandboxes.jackpot.settle()
        assert len(bridge.received) == 1, "READY before the confirm"
        url = f"{sandboxes.jackpot_url}/v2/voucher/{voucher.id}/confirm"
        async with http.put(url, headers={"apikey": sandboxes.jackpot.api_key}) as r:
            assert r.status == 200
        await bridge.wait_for(2)
        assert bridge.received[1][1]["state"] == "READY"
        assert bridge.received[1][1]["signedUrl"].startswith(sandboxes.pdf_origin)


async def test_without_forced_manual_confirm_the_200_to_reserved_is_the_agreement(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    async with Receiver() as bridge:
        sandboxes.jackpot.reserve_notification_url = f"{bridge.url}/notify"
        jackpot = client(http, sandboxes, confirm=ConfirmMode.NOTIFICATION)
        voucher = await _reserve(jackpot, 2500)
        await bridge.wait_for(2)
        assert [body["state"] for _, body, _ in bridge.received] == ["RESERVED", "READY"]
        assert sandboxes.jackpot.vouchers[str(voucher.id)]["state"] == State.READY


async def test_failed_notifications_are_retried_a_bounded_number_of_times(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    async with Receiver(default=500) as bridge:
        sandboxes.jackpot.reserve_notification_url = f"{bridge.url}/notify"
        await _reserve(client(http, sandboxes), 2500)
        await asyncio.wait_for(sandboxes.jackpot.settle(), 30)
        assert len(bridge.received) == sandboxes.jackpot.notify_attempts == 3


# Doshii: webhooks and the till


async def test_a_sale_is_delivered_with_basic_auth_and_retried_until_a_2xx(
    sandboxes: Sandboxes,
) -> None:
    async with Receiver([503, 500]) as app:
        doshii = sandboxes.doshii
        doshii.register_webhook(Webhook(CARD_ACTIVATE, f"{app.url}/hook", "key", "token-123"))
        request_id = doshii.sell_card(amount_cents=1999, card_ref="1111-2222-3333")
        assert await doshii.deliver_sale(request_id) == 200
        assert [a.status for a in doshii.webhook_deliveries] == [503, 500, 200]
        _, body, headers = app.received[0]
        assert headers["Authorization"] == "Basic " + base64.b64encode(b"key:token-123").decode()
        assert body["event"] == "card_activate"
        data = body["data"]
        assert (data["id"], data["status"]) == (request_id, "pending")
        assert data["locationId"] == doshii.locations[request_id]
        assert data["requestData"]["amount"] == "1999"
        assert data["requestData"]["cardRef"] == "1111-2222-3333"
        assert data["requestData"]["cardProviderAuthPassword"]
        assert doshii.requests[request_id]["status"] == "pending"
        assert "requestData" not in doshii.record(request_id)


async def test_a_sale_nobody_takes_stops_after_doshiis_retries(sandboxes: Sandboxes) -> None:
    sandboxes.doshii.webhook_retries = 3
    async with Receiver(default=503) as app:
        sandboxes.doshii.register_webhook(Webhook(CARD_ACTIVATE, app.url))
        request_id = sandboxes.doshii.sell_card()
        assert await sandboxes.doshii.deliver_sale(request_id) == 503
        assert len(app.received) == 4  # the first try and three retries
        assert "Authorization" not in app.received[0][2]
    sandboxes.doshii.webhooks.clear()
    with pytest.raises(LookupError):
        await sandboxes.doshii.deliver_sale(request_id)


async def test_webhooks_are_registered_through_doshiis_api_per_location(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    doshii = sandboxes.doshii
    token = jwt.encode(
        {"clientId": doshii.client_id, "timestamp": int(time.time())}, doshii.client_secret
    )
    auth = {"authorization": f"Bearer {token}"}
    hook = {
        "event": "card_activate",
        "webhookUrl": "http://127.0.0.1:9/all",
        "authenticationKey": "k",
        "authenticationToken": "t",
    }
    url = f"{sandboxes.doshii_url}/webhooks"
    async with http.post(url, json=hook) as r:
        assert r.status == 401
    async with http.post(url, json=hook, headers=auth) as r:
        assert r.status == 201
        assert "authenticationToken" not in await r.json()
    one = {**hook, "webhookUrl": "http://127.0.0.1:9/one"}
    async with http.post(url, json=one, headers={**auth, "doshii-location-id": "loc1"}) as r:
        assert r.status == 201
    async with http.post(url, json={"event": "card_activate"}, headers=auth) as r:
        assert r.status == 400
    assert doshii.webhook_for(CARD_ACTIVATE, "loc1") == Webhook(
        CARD_ACTIVATE, "http://127.0.0.1:9/one", "k", "t", "loc1"
    )
    assert doshii.webhook_for(CARD_ACTIVATE, "loc2") == Webhook(
        CARD_ACTIVATE, "http://127.0.0.1:9/all", "k", "t"
    )
    async with http.get(url, headers=auth) as r:
        assert len(await r.json()) == 2
    async with http.delete(f"{url}/card_activate", headers=auth) as r:
        assert r.status == 204
    assert doshii.webhook_for(CARD_ACTIVATE, "loc2") is None


async def test_the_till_control_route_sells_and_delivers(
    http: aiohttp.ClientSession, sandboxes: Sandboxes
) -> None:
    control = f"{sandboxes.doshii.public_base_url}/_sandbox"
    async with Receiver() as app:
        async with http.post(f"{control}/till", json={"amount_cents": 2500}) as r:
            assert r.status == 409  # no webhook yet
        hook = {"webhook_url": app.url, "authentication_key": "k", "authentication_token": "t"}
        async with http.post(f"{control}/webhooks", json=hook) as r:
            assert r.status == 200
        async with http.post(f"{control}/till", json={"amount_cents": 2500, "wait": True}) as r:
            sale = await r.json()
        assert sale["deliveryStatus"] == 200
        async with http.post(f"{control}/requests/{sale['id']}/deliver", json={}) as r:
            assert (await r.json())["deliveryStatus"] == 200
        async with http.get(f"{control}/requests/{sale['id']}") as r:
            record = await r.json()
        assert [d["status"] for d in record["webhookDeliveries"]] == [200, 200]
        assert len(app.received) == 2


# The till against the real ingress


async def test_a_till_sale_reaches_the_intake_queue_through_the_ingress(
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    sandboxes: Sandboxes,
) -> None:
    settings = make_settings(doshii_webhook_auth=sales.WEBHOOK_AUTH, spool_max_bytes=0)
    ingress = await aiohttp_client(RunnerTestServer(create_app(settings)))
    url = f"http://{ingress.host}:{ingress.port}{DOSHII_WEBHOOK_PATH}"
    doshii = sandboxes.doshii
    doshii.register_webhook(Webhook(CARD_ACTIVATE, url, sales.WEBHOOK_KEY, sales.WEBHOOK_TOKEN))
    request_id = doshii.sell_card(amount_cents=2500, card_ref="9999-8888-7777")
    # Until the ingress has declared its queues it answers 503: Doshii's retries cover that.
    assert await asyncio.wait_for(doshii.deliver_sale(request_id), 30) == 200
    queue = await channel.get_queue(broker.queue(Stage.INTAKE), ensure=False)
    message = await queue.get(no_ack=True, fail=False)
    assert message is not None
    intake = IntakeRequest.model_validate_json(message.body)
    assert (intake.request_id, intake.amount_cents, intake.card_ref_last4) == (
        request_id,
        2500,
        "7777",
    )
    event_credentials = sales.credentials(doshii.sales[request_id])
    for secret in [*event_credentials, "9999-8888-7777"]:
        assert secret not in message.body.decode()


def test_the_till_needs_the_webhook_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRIDGE_DOSHII_WEBHOOK_AUTH", raising=False)
    with pytest.raises(SystemExit) as stopped:
        bridge_main(["sandbox", "--till", "http://127.0.0.1:9/notifications/doshii"])
    assert stopped.value.code == 2
    assert bridge_main(["sandbox", "--till-sales", "3"]) == 2


async def test_bridge_sandbox_till_sells_against_an_ingress_and_logs_each_ending(
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    tmp_path: Path,
) -> None:
    settings = make_settings(doshii_webhook_auth=sales.WEBHOOK_AUTH, spool_max_bytes=0)
    ingress = await aiohttp_client(RunnerTestServer(create_app(settings)))
    url = f"http://{ingress.host}:{ingress.port}{DOSHII_WEBHOOK_PATH}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    env["BRIDGE_DOSHII_WEBHOOK_AUTH"] = sales.WEBHOOK_AUTH
    log_path = tmp_path / "sandbox.log"
    args = ["--jackpot-port", "0", "--doshii-port", "0", "--till", url, "--till-sales", "2"]
    # No intake worker runs here: each sale stays pending, and says so once the wait is over.
    args += ["--till-wait-s", "1"]
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "sandbox",
            *args,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:

        def endings() -> list[dict[str, Any]]:
            lines = log_path.read_text(errors="replace").splitlines()
            events = [json.loads(line) for line in lines if line.startswith("{")]
            return [event for event in events if event.get("event") == "till sale"]

        async def two_endings() -> None:
            # The child's log is only observable by reading its file: poll it, bounded below.
            while len(endings()) < 2 and process.returncode is None:  # noqa: ASYNC110
                await asyncio.sleep(0.1)

        await asyncio.wait_for(two_endings(), 30)
        assert [(e["outcome"], e["webhook_status"]) for e in endings()] == [("pending", 200)] * 2
        queue = await channel.declare_queue(broker.queue(Stage.INTAKE), passive=True)
        assert queue.declaration_result.message_count == 2
        assert sales.WEBHOOK_TOKEN not in log_path.read_text(errors="replace")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
