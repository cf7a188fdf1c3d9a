"""schemathesis against /openapi.json: no 5xx, and every answer matches the documented schema."""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.config import SchemathesisConfig

from ingress.app import NOTIFICATION_PATH, create_app
from ingress.doshii import DOSHII_WEBHOOK_PATH
from ingress.openapi import openapi_document
from shared import topology
from shared.broker import declare_topology
from shared.service import start_site
from shared.settings import Settings
from tests.conftest import AMQP_URL, TEST_SECRETS, TEST_TIERS_S
from tests.support.vouchers import key

# schemathesis's default list of answers that reject negative data, plus 413: a body made
# invalid by a field longer than its maxLength can also be over the ingress's 64 KiB.
REJECTING_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422"]
REJECTING_STATUSES += ["428", "429", "5xx"]
schema = schemathesis.openapi.from_dict(
    openapi_document(),
    config=SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTING_STATUSES}}}
    ),
)
EXAMPLES = 60
WEBHOOK_AUTH = "doshii-key:doshii-webhook-token-0123456789"
BASIC = "Basic " + base64.b64encode(WEBHOOK_AUTH.encode()).decode()


@dataclass
class LiveIngress:
    base_url: str
    stop: asyncio.Event
    loop: asyncio.AbstractEventLoop


def _settings(folder: Path) -> Settings:
    return Settings(
        amqp_url=AMQP_URL,
        namespace=f"t-{uuid.uuid4().hex[:12]}",
        key_secrets=",".join(TEST_SECRETS),
        jackpot_api_key="k",
        doshii_client_id="c",
        doshii_client_secret="s",
        spool_dir=folder / "spool",
        doshii_webhook_auth=WEBHOOK_AUTH,
        retry_tiers_s=",".join(map(str, TEST_TIERS_S)),
    )


@pytest.fixture(scope="module")
def live_ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveIngress]:
    """The real ingress on a loopback port, in a thread of its own, with its own namespace."""
    config = _settings(tmp_path_factory.mktemp("openapi"))
    started = threading.Event()
    holder: dict[str, LiveIngress] = {}

    async def serve() -> None:
        await declare_topology(config)
        runner, port = await start_site(create_app(config), "127.0.0.1", 0, shutdown_timeout_s=5)
        stop = asyncio.Event()
        holder["live"] = LiveIngress(f"http://127.0.0.1:{port}", stop, asyncio.get_running_loop())
        started.set()
        await stop.wait()
        await runner.cleanup()
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL)
        async with connection, connection.channel() as channel:
            await topology.delete(channel, config.namespace, tiers_s=config.retry_tiers_s)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30), "the ingress did not start"
    live = holder["live"]
    yield live
    live.loop.call_soon_threadsafe(live.stop.set)
    thread.join(30)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_any_request_gets_a_documented_answer(
    case: schemathesis.Case[Any], live_ingress: LiveIngress
) -> None:
    case.call_and_validate(base_url=live_ingress.base_url)


@schema.include(path=NOTIFICATION_PATH).parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_signed_notifications_get_a_documented_answer(
    case: schemathesis.Case[Any], live_ingress: LiveIngress
) -> None:
    # With a real key the generated bodies reach validation and publishing, not just the 403.
    case.query = {**(case.query or {}), "notificationKey": key()}
    response = case.call_and_validate(base_url=live_ingress.base_url)
    assert response.status_code != 403, "a valid key was refused"


@schema.include(path=DOSHII_WEBHOOK_PATH).parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_authenticated_doshii_webhooks_get_a_documented_answer(
    case: schemathesis.Case[Any], live_ingress: LiveIngress
) -> None:
    # With the registered credentials the generated bodies reach validation and publishing.
    # The two checks that resend without credentials are the unauthenticated test's job: here
    # they would resend these very credentials.
    # Set on the case itself: given as call headers, schemathesis's own generated auth wins.
    headers = dict(case.headers or {})
    headers["Authorization"] = BASIC
    case.headers = headers  # type: ignore[assignment]
    response = case.call_and_validate(
        base_url=live_ingress.base_url,
        excluded_checks=[checks.ignored_auth, checks.missing_required_header],
    )
    assert response.status_code != 401, "the registered credentials were refused"
