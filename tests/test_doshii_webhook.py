"""Doshii's webhook on the ingress, against the real broker: every row of its answer table."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingress.app import MAX_BODY_BYTES, create_app
from ingress.doshii import DOSHII_WEBHOOK_PATH
from shared import envelope, logs
from shared.intake import CardRefHasher, IntakeRequest
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.conftest import TEST_SECRETS
from tests.support.sales import (
    OLD_WEBHOOK_KEY,
    OLD_WEBHOOK_TOKEN,
    WEBHOOK_AUTH,
    WEBHOOK_KEY,
    WEBHOOK_TOKEN,
    basic,
    card_activate,
    credentials,
    encode,
)
from tests.support.served import RunnerTestServer

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_client(
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
    make_settings: Callable[..., Settings],
    broker: Names,
) -> MakeClient:
    async def make(*, wait: bool = True, **overrides: Any) -> Client:
        values: dict[str, Any] = {"doshii_webhook_auth": WEBHOOK_AUTH, "spool_max_bytes": 0}
        values.update(overrides)
        client = await aiohttp_client(RunnerTestServer(create_app(make_settings(**values))))
        if wait:
            await _wait_ready(client)
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def _wait_ready(client: Client, timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        # Readiness is only observable over HTTP, so poll it, bounded by the timeout.
        while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


async def deliver(client: Client, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return await client.post(
        DOSHII_WEBHOOK_PATH, data=body, headers=basic() if headers is None else headers
    )


async def intake_depth(channel: AbstractChannel, names: Names) -> int:
    declared = await channel.declare_queue(names.queue(Stage.INTAKE), passive=True)
    return declared.declaration_result.message_count or 0


async def queued(channel: AbstractChannel, names: Names) -> int:
    total = 0
    for stage in Stage:
        declared = await channel.declare_queue(names.queue(stage), passive=True)
        total += declared.declaration_result.message_count or 0
    return total


async def take_intake(channel: AbstractChannel, names: Names) -> AbstractIncomingMessage:
    queue = await channel.get_queue(names.queue(Stage.INTAKE), ensure=False)
    message = await queue.get(no_ack=True, fail=False)
    assert message is not None, "nothing on the intake queue"
    return message


async def test_a_pending_sale_is_confirmed_on_the_intake_queue_then_answered(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    event = card_activate("1354", amount="2500", card_ref="1234-5678-9012")
    response = await deliver(client, encode(event))

    assert response.status == 200
    assert await response.json() == {"status": "accepted", "messageId": "1354:card_activate"}
    message = await take_intake(channel, broker)
    assert message.message_id == "1354:card_activate"
    assert message.correlation_id == "1354"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.routing_key == "doshii.card_activate"
    intake = IntakeRequest.model_validate_json(message.body)
    assert intake.request_id == "1354"
    assert intake.location_id == "aH43yx2"
    assert intake.amount_cents == 2500
    assert intake.pos_terminal_id == "23fd46"
    assert intake.card_ref_last4 == "9012"
    assert intake.card_ref_hash == CardRefHasher(TEST_SECRETS[0])("1234-5678-9012")
    assert message.headers[envelope.REQUEST] == "1354"
    assert message.headers[envelope.LOCATION] == "aH43yx2"
    assert message.headers[envelope.AMOUNT_CENTS] == 2500
    assert isinstance(message.headers[envelope.RECEIVED_MS], int)
    # What must never travel: the card provider's credentials and the card reference itself.
    published = message.body.decode() + json.dumps(message.headers, default=str)
    for secret in [*credentials(event), "1234-5678-9012", WEBHOOK_TOKEN]:
        assert secret not in published
    assert await queued(channel, broker) == 0


async def test_every_registered_pair_is_accepted_for_rotation(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    for key, token in ((WEBHOOK_KEY, WEBHOOK_TOKEN), (OLD_WEBHOOK_KEY, OLD_WEBHOOK_TOKEN)):
        response = await deliver(client, encode(card_activate()), basic(key, token))
        assert response.status == 200, key
    assert await intake_depth(channel, broker) == 2


async def test_a_sale_with_no_card_ref_and_an_integer_amount_is_published(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    response = await deliver(client, encode(card_activate("77", amount=1999, card_ref=None)))
    assert response.status == 200
    intake = IntakeRequest.model_validate_json((await take_intake(channel, broker)).body)
    assert (intake.amount_cents, intake.card_ref_hash, intake.card_ref_last4) == (1999, None, None)


async def test_doshii_retries_of_one_event_carry_one_message_id(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    event = card_activate("4242")
    for _ in range(3):
        assert (await deliver(client, encode(event))).status == 200
    ids = {(await take_intake(channel, broker)).message_id for _ in range(3)}
    assert ids == {"4242:card_activate"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b'{"event": null}',
        encode({"event": "card_enquiry", "data": {"id": "9"}}),
        encode({"event": "something_new", "data": [1, 2]}),
        encode(card_activate(status="cancelled")),
        encode(card_activate(status="activated", amount="oops")),
    ],
    ids=["empty", "no-event", "null-event", "enquiry", "unknown", "cancelled", "activated"],
)
async def test_other_events_and_verification_checks_are_200_counted_and_not_published(
    client: Client, channel: AbstractChannel, broker: Names, body: bytes
) -> None:
    response = await deliver(client, body)
    assert response.status == 200
    answer = await response.json()
    assert answer["status"] == "ignored"
    assert answer["detail"]
    assert await queued(channel, broker) == 0
    metrics = await (await client.get("/metrics")).text()
    assert 'bridge_doshii_webhooks_total{outcome="ignored"}' in metrics


async def test_an_empty_verification_check_needs_no_content_type(
    client: Client, broker: Names
) -> None:
    headers = {"Authorization": basic()["Authorization"]}
    response = await client.post(DOSHII_WEBHOOK_PATH, headers=headers)
    assert response.status == 200
    assert (await response.json())["status"] == "ignored"


def _wrong_credentials() -> dict[str, dict[str, str]]:
    good = basic()["Authorization"]
    return {
        "none": {},
        "wrong token": {"Authorization": basic(WEBHOOK_KEY, "x" * 30)["Authorization"]},
        "key of one pair, token of another": {
            "Authorization": basic(WEBHOOK_KEY, OLD_WEBHOOK_TOKEN)["Authorization"]
        },
        "bearer": {"Authorization": good.replace("Basic", "Bearer")},
        "not base64": {"Authorization": "Basic !!!not-base64!!!"},
        "truncated": {"Authorization": good[:-4]},
        "empty basic": {"Authorization": "Basic "},
        "huge": {"Authorization": "Basic " + "QUFB" * 2000},
    }


@pytest.mark.parametrize("case", list(_wrong_credentials()))
async def test_missing_or_wrong_credentials_are_401_with_a_challenge(
    client: Client, channel: AbstractChannel, broker: Names, case: str
) -> None:
    headers = {"Content-Type": "application/json", **_wrong_credentials()[case]}
    response = await deliver(client, encode(card_activate()), headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic ")
    answer = await response.json()
    assert answer["error"] == "unauthorized"
    assert await queued(channel, broker) == 0


@pytest.mark.parametrize(
    ("body", "error", "named"),
    [
        (b"{not json", "invalid_json", "JSON"),
        (b"[]", "invalid_event", "JSON object"),
        (b'"card_activate"', "invalid_event", "JSON object"),
        (b'{"event": 42}', "invalid_event", "event"),
        (b'{"event": "card_activate"}', "invalid_event", "data"),
        (encode(card_activate(amount="25.00")), "invalid_event", "data.requestData.amount"),
        (encode(card_activate(amount="-2500")), "invalid_event", "data.requestData.amount"),
        (encode(card_activate(amount=25.0)), "invalid_event", "data.requestData.amount"),
        (encode(card_activate(amount="0")), "invalid_event", "data.requestData.amount"),
        (encode(card_activate(amount="9" * 40)), "invalid_event", "data.requestData.amount"),
        (encode(card_activate(amount=True)), "invalid_event", "data.requestData.amount"),
        (encode(card_activate("../../webhooks")), "invalid_event", "data.id"),
        (encode(card_activate(location_id="")), "invalid_event", "data.locationId"),
    ],
)
async def test_bad_bodies_are_400_naming_the_problem(
    client: Client, channel: AbstractChannel, broker: Names, body: bytes, error: str, named: str
) -> None:
    response = await deliver(client, body)
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == error
    assert named in json.dumps(answer["detail"])
    assert await queued(channel, broker) == 0


async def test_a_missing_amount_is_400_naming_it(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    event = card_activate()
    del event["data"]["requestData"]["amount"]
    response = await deliver(client, encode(event))
    assert response.status == 400
    assert "data.requestData.amount" in json.dumps((await response.json())["detail"])
    assert await queued(channel, broker) == 0


async def test_a_body_over_64_kib_is_413(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    body = encode(card_activate(pad="x" * MAX_BODY_BYTES))
    response = await deliver(client, body)
    assert response.status == 413
    assert "65536" in (await response.json())["detail"]
    # Chunked, so no Content-Length announces it.
    response = await deliver(client, io.BytesIO(body))  # type: ignore[arg-type]
    assert response.status == 413
    assert await queued(channel, broker) == 0


async def test_a_wrong_content_type_is_415(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    headers = {**basic(), "Content-Type": "text/plain"}
    response = await deliver(client, encode(card_activate()), headers)
    assert response.status == 415
    assert "text/plain" in (await response.json())["detail"]
    assert await queued(channel, broker) == 0


async def test_without_webhook_credentials_the_route_is_not_served(
    make_client: MakeClient, channel: AbstractChannel, broker: Names
) -> None:
    client = await make_client(doshii_webhook_auth="")
    response = await deliver(client, encode(card_activate()))
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    assert await queued(channel, broker) == 0


async def test_with_the_broker_away_a_sale_is_spooled_then_reaches_the_intake_queue(
    make_client: MakeClient, channel: AbstractChannel, broker: Names
) -> None:
    spool = {"spool_max_bytes": 1024 * 1024}
    # Nothing listens on port 9: the publisher never connects, so the sale goes to the spool.
    away = await make_client(wait=False, amqp_url="amqp://guest:guest@127.0.0.1:9/", **spool)
    response = await deliver(away, encode(card_activate("5150")))
    assert response.status == 200
    assert (await response.json())["status"] == "spooled"
    assert await intake_depth(channel, broker) == 0
    await away.close()

    # An ingress with the broker back drains the spool it finds into the intake queue.
    await make_client(wait=False, **spool)

    async def drained() -> None:
        # The queue's depth is only observable by asking the broker: poll, bounded below.
        while await intake_depth(channel, broker) == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(drained(), 10)
    message = await take_intake(channel, broker)
    assert message.message_id == "5150:card_activate"
    assert IntakeRequest.model_validate_json(message.body).request_id == "5150"


async def test_one_log_line_per_webhook_without_credentials(
    client: Client, channel: AbstractChannel, broker: Names
) -> None:
    stream = io.StringIO()
    logs.configure("info", json=True, stream=stream, cache=False)
    event = card_activate("808")
    try:
        await deliver(client, encode(event))
        await deliver(client, encode(card_activate()), {"Content-Type": "application/json"})
        await deliver(client, b"{}")
        await asyncio.sleep(0)
    finally:
        logs.configure("info", cache=False)
    captured = stream.getvalue()
    lines = [json.loads(line) for line in captured.splitlines() if "doshii_webhook" in line]
    assert [line["outcome"] for line in lines] == ["accepted", "unauthorized", "ignored"]
    assert lines[0]["doshii_request_id"] == "808"
    for secret in [*credentials(event), "1234-5678-9012", WEBHOOK_TOKEN, WEBHOOK_KEY]:
        assert secret not in captured
    assert "Basic " not in captured
