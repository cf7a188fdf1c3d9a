"""A sale at the till, through the real pipeline: Doshii's webhook, intake, Jackpot, ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel

from sandbox.doshii import Webhook
from sandbox.faults import Fault
from sandbox.till_demo import reserved_for
from shared.journal import State
from shared.keys import KeyRing
from shared.ledger import Ledger
from shared.settings import Settings
from shared.topology import Names
from tests.chaos.ledger import check, reckon, record
from tests.support.journeys import wait_state
from tests.support.pipeline import Pipeline, Voucher, running_pipeline, settings_env
from tests.support.tcpproxy import POSTGRES_PORT, proxy_to
from workers import dlq

pytestmark = pytest.mark.timeout(180)

WEBHOOK_KEY, WEBHOOK_TOKEN = "doshii-app-key", "doshii-app-token-0123456789"
CREDENTIAL_FIELDS = ("cardAuthorisationKey", "cardProviderAuthId", "cardProviderAuthPassword")


@asynccontextmanager
async def till(
    make_settings: Callable[..., Settings], ledger: Ledger, **overrides: Any
) -> AsyncIterator[Pipeline]:
    """The pipeline with the till wired in: Doshii's webhook to the ingress, Jackpot's
    notifications to the ingress, the intake worker running with the others."""
    async with running_pipeline(
        make_settings,
        ledger=ledger,
        doshii_webhook_auth=f"{WEBHOOK_KEY}:{WEBHOOK_TOKEN}",
        **overrides,
    ) as pipeline:
        base = pipeline.ingress_url
        pipeline.sandboxes.jackpot.reserve_notification_url = pipeline.notification_url
        pipeline.sandboxes.doshii.register_webhook(
            Webhook("card_activate", f"{base}/notifications/doshii", WEBHOOK_KEY, WEBHOOK_TOKEN)
        )
        yield pipeline


async def final(pipeline: Pipeline, request_id: str, timeout_s: float = 30) -> dict[str, Any]:
    await pipeline.sandboxes.doshii.wait_for_status(
        request_id, "activated", "cancelled", timeout_s=timeout_s
    )
    record_: dict[str, Any] = pipeline.sandboxes.doshii.requests[request_id]
    return record_


def vouchers_for(pipeline: Pipeline, request_id: str) -> list[dict[str, Any]]:
    """The vouchers Jackpot reserved for a till's request (their key names it)."""
    return reserved_for(pipeline.sandboxes, KeyRing(pipeline.settings.key_secrets), request_id)


def as_voucher(pipeline: Pipeline, request_id: str) -> Voucher:
    (voucher,) = vouchers_for(pipeline, request_id)
    location = pipeline.sandboxes.doshii.locations[request_id]
    return Voucher(request_id, location, voucher["id"], voucher["couponId"], "")


async def test_a_sale_at_the_till_ends_as_an_activated_card(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with till(make_settings, ledger) as pipeline:
        doshii = pipeline.sandboxes.doshii
        request_id = doshii.sell_card(amount_cents=2500, card_ref="6280123412345678")
        assert await doshii.deliver_sale(request_id) == 200
        record_ = await final(pipeline, request_id)
        assert record_["status"] == "activated"
        assert record_["amount"] == "2500" or str(record_["amount"]) == "2500"
        (voucher,) = vouchers_for(pipeline, request_id)
        assert record_["reference"] == voucher["couponId"]
        row = await wait_state(ledger, request_id, State.ACTIVATED)
        await pipeline.settled(channel)
        journey = [
            (s["stage"], s["outcome"]) for s in await ledger.journey(row["voucher_id"], request_id)
        ]
        by_request = [
            (s["stage"], s["outcome"]) for s in await ledger.fetch("request_journey", request_id)
        ]
        (claim,) = await ledger.fetch("find_request", request_id)
        sale = doshii.sales[request_id]
    assert journey[:2] == [("ingress", "sale received"), ("intake", "reserved at Jackpot")]
    # Every step names the request too: `bridge status <request id>` shows the whole way.
    assert by_request == journey
    # The intake's hand-off and Jackpot's own RESERVED notification, in either order.
    assert {("intake", "received"), ("ingress", "received"), ("reservations", "confirmed")} <= set(
        journey
    )
    assert journey[-1] == ("pdfs", "activated")
    assert claim["state"] == "reserved"
    assert claim["voucher_id"] == row["voucher_id"]
    assert claim["card_ref_last4"] == "5678"
    # The till's credentials and the card reference never reach logs, messages or the ledger.
    logs = capfd.readouterr()
    secrets = [str(sale["data"]["requestData"][f]) for f in CREDENTIAL_FIELDS]
    stored = f"{dict(claim)} {row} {journey}"
    for secret in [*secrets, "6280123412345678"]:
        assert secret not in logs.out + logs.err
        assert secret not in stored


async def test_ten_deliveries_of_one_sale_reserve_one_voucher(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with till(make_settings, ledger) as pipeline:
        doshii = pipeline.sandboxes.doshii
        request_id = doshii.sell_card(amount_cents=4000)
        statuses = await asyncio.gather(*(doshii.deliver_sale(request_id) for _ in range(10)))
        assert statuses == [200] * 10
        assert (await final(pipeline, request_id))["status"] == "activated"
        await wait_state(ledger, request_id, State.ACTIVATED)
        await pipeline.settled(channel)
        assert len(vouchers_for(pipeline, request_id)) == 1
        assert len(await ledger.find(request_id)) == 1


async def test_refusals_cancel_the_request_with_a_reason_the_till_shows(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with till(make_settings, ledger) as pipeline:
        doshii, jackpot = pipeline.sandboxes.doshii, pipeline.sandboxes.jackpot
        offer = jackpot.catalogue["sandbox-store"].offers["gift-card"]
        offer.stock = 0
        out_of_stock = doshii.sell_card(amount_cents=2500)
        await doshii.deliver_sale(out_of_stock)
        record_ = await final(pipeline, out_of_stock)
        assert record_["status"] == "cancelled"
        assert record_["cancelledReason"] == "No voucher available for 25.00: out of stock"
        offer.stock = 10
        pipeline.sandboxes.faults.set("jackpot.reserve", Fault(status=400, times=1))
        refused = doshii.sell_card(amount_cents=3000)
        await doshii.deliver_sale(refused)
        record_ = await final(pipeline, refused)
        assert record_["status"] == "cancelled"
        assert record_["cancelledReason"].startswith("No voucher available for 30.00")
        await pipeline.settled(channel)
        assert vouchers_for(pipeline, out_of_stock) == vouchers_for(pipeline, refused) == []
        (claim,) = await ledger.fetch("find_request", out_of_stock)
        assert claim["state"] == "cancelled"
        steps = [s["outcome"] for s in await ledger.fetch("request_journey", out_of_stock)]
        assert steps == ["sale received", "refused", "cancelled"]
        assert await dlq.list_dead(pipeline.settings) == []


async def test_jackpot_down_past_the_deadline_cancels_supplier_unavailable(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with till(make_settings, ledger, intake_deadline_s=4.0) as pipeline:
        doshii = pipeline.sandboxes.doshii
        pipeline.sandboxes.faults.set("jackpot.reserve", Fault(status=503, times=-1))
        request_id = doshii.sell_card(amount_cents=2500)
        await doshii.deliver_sale(request_id)
        record_ = await final(pipeline, request_id, timeout_s=40)
        assert record_["status"] == "cancelled"
        assert record_["cancelledReason"] == "No voucher available for 25.00: supplier unavailable"
        await pipeline.settled(channel)
        steps = [s["outcome"] for s in await ledger.fetch("request_journey", request_id)]
    assert "retried" in steps
    assert steps[-2:] == ["cancelled", "cancelled"]  # the intake's decision, then Doshii's


async def test_lost_notifications_still_end_activated(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    """Jackpot's RESERVED and READY never arrive: the intake's hand-off and the sweeper finish."""
    from workers.deps import open_deps
    from workers.sweeper import Sweeper

    async with till(
        make_settings, ledger, sweep_ready_after_s=0.3, sweep_interval_s=0.2
    ) as pipeline:
        pipeline.sandboxes.jackpot.reserve_notification_url = "http://127.0.0.1:9/lost"
        doshii = pipeline.sandboxes.doshii
        request_id = doshii.sell_card(amount_cents=2500)
        await doshii.deliver_sale(request_id)
        await wait_state(ledger, request_id, State.CONFIRMED)
        async with open_deps(pipeline.settings) as deps:
            stop = asyncio.Event()
            sweeping = asyncio.create_task(Sweeper(pipeline.settings, ledger, deps).run(stop))
            try:
                assert (await final(pipeline, request_id))["status"] == "activated"
            finally:
                stop.set()
                await sweeping
        await wait_state(ledger, request_id, State.ACTIVATED)
        await pipeline.settled(channel)


async def test_intake_killed_after_jackpot_answered_reserves_once_and_activates(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
    settings: Settings,
) -> None:
    database_url = settings.database_url.get_secret_value()
    async with (
        proxy_to(database_url, POSTGRES_PORT) as proxy,
        till(make_settings, ledger, intake=False) as pipeline,
    ):
        jackpot, doshii = pipeline.sandboxes.jackpot, pipeline.sandboxes.doshii
        proxied = proxy.url_through(database_url)
        env = {
            **os.environ,
            **settings_env(pipeline.settings),
            "BRIDGE_DATABASE_URL": proxied,
            "BRIDGE_WORKER_HTTP_PORT": "0",
        }
        reserve_with = jackpot.reserve_with

        def reserve_then_freeze(*args: Any, **kwargs: Any) -> dict[str, Any]:
            # Jackpot reserves and answers; the intake cannot record it: the ledger froze.
            proxy.pause()
            return reserve_with(*args, **kwargs)

        jackpot.reserve_with = reserve_then_freeze  # type: ignore[method-assign]
        first = await intake_process(env)
        request_id = doshii.sell_card(amount_cents=2500)
        try:
            await doshii.deliver_sale(request_id)
            await asyncio.wait_for(until(lambda: bool(vouchers_for(pipeline, request_id))), 30)
            await asyncio.sleep(0.3)  # the answer reaches the intake, which now waits on PG
            first.send_signal(signal.SIGKILL)
            await first.wait()
        finally:
            if first.returncode is None:
                first.kill()
        jackpot.reserve_with = reserve_with  # type: ignore[method-assign]
        proxy.resume()
        resumed = time.monotonic()
        second = await intake_process(env)
        try:
            assert (await final(pipeline, request_id, timeout_s=60))["status"] == "activated"
            await wait_state(ledger, request_id, State.ACTIVATED)
            await pipeline.settled(channel)
            drained_s = time.monotonic() - resumed
        finally:
            second.send_signal(signal.SIGTERM)
            await asyncio.wait_for(second.wait(), 20)
        assert len(vouchers_for(pipeline, request_id)) == 1
        letters = await dlq.list_dead(pipeline.settings)
        scenario = reckon(
            "I1. intake SIGKILLed after Jackpot answered",
            [as_voucher(pipeline, request_id)],
            pipeline.sandboxes,
            letters,
            drained_s,
        )
    record(
        scenario, extra_notes=["one reservation at Jackpot; the RESERVED notification linked it"]
    )
    check(scenario)


async def intake_process(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "worker", "intake", env=env
    )


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.005)
