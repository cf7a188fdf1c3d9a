"""End to end through the ingress: sandboxes on loopback, the real broker, every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from aio_pika.abc import AbstractChannel

from sandbox.faults import Fault
from shared.journal import State
from shared.ledger import Ledger
from shared.settings import Settings
from shared.topology import Names
from tests.support.journeys import HAPPY, wait_state
from tests.support.pipeline import (
    Pipeline,
    Voucher,
    counting_server,
    running_pipeline,
    settings_env,
)
from workers import dlq


def activated_puts(pipeline: Pipeline, voucher: Voucher) -> list[dict[str, object]]:
    puts = pipeline.sandboxes.doshii.puts.get(voucher.request_id, [])
    return [p for p in puts if p["status"] == 200]


def assert_activated(pipeline: Pipeline, voucher: Voucher) -> None:
    record = pipeline.sandboxes.doshii.requests[voucher.request_id]
    jackpot = pipeline.sandboxes.jackpot.vouchers[voucher.voucher_id]
    assert record["status"] == "activated"
    assert record["amount"] == "11000"
    assert record["reference"] == voucher.coupon_id
    assert datetime.fromisoformat(record["expiryDate"]) == datetime.fromisoformat(
        jackpot["validityDate"]
    )
    pdf = Path(pipeline.settings.pdf_dir) / f"{voucher.voucher_id}.pdf"
    assert pdf.read_bytes() == pipeline.sandboxes.jackpot.pdf(voucher.voucher_id)
    assert pdf.read_bytes().startswith(b"%PDF-")


async def test_happy_path_confirms_stores_the_pdf_and_activates(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        voucher = pipeline.new_voucher()
        outcome = await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        assert (outcome.reserved_status, outcome.ready_status) == (200, 200)
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        assert pipeline.sandboxes.jackpot.confirm_calls[voucher.voucher_id] == 1
        assert_activated(pipeline, voucher)
        assert len(activated_puts(pipeline, voucher)) == 1
        await pipeline.settled(channel)
    assert await dlq.list_dead(pipeline.settings) == []


async def test_expired_link_is_renewed(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id, expired_link=True)
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        assert pipeline.sandboxes.jackpot.signedurl_calls[voucher.voucher_id] == 1
        assert pipeline.sandboxes.faults.calls["jackpot.pdf"] == 2  # refused, then fresh
        assert_activated(pipeline, voucher)


async def test_jackpot_500_twice_then_fine(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        pipeline.sandboxes.faults.set("jackpot.confirm", Fault(status=500, times=2))
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        assert pipeline.sandboxes.faults.calls["jackpot.confirm"] == 3
        assert_activated(pipeline, voucher)
        await pipeline.settled(channel)
    assert await dlq.list_dead(pipeline.settings) == []


async def test_doshii_503_three_times_then_fine(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        pipeline.sandboxes.faults.set("doshii.put", Fault(status=503, times=3))
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        assert pipeline.sandboxes.faults.calls["doshii.put"] == 4
        assert len(activated_puts(pipeline, voucher)) == 1
        # Each retry found the PDF stored: only the activation was pushed again.
        assert pipeline.sandboxes.jackpot.pdf_downloads[voucher.voucher_id] == 1
        await pipeline.settled(channel)
    assert await dlq.list_dead(pipeline.settings) == []


async def test_doshii_429_retry_after_is_honoured(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    retry_after_s = 2
    async with running_pipeline(make_settings) as pipeline:
        pipeline.sandboxes.faults.set(
            "doshii.put", Fault(status=429, times=1, retry_after_s=retry_after_s)
        )
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        puts = pipeline.sandboxes.doshii.puts[voucher.request_id]
        assert [p["status"] for p in puts] == [429, 200]
        at = [datetime.fromisoformat(str(p["at"])) for p in puts]
        waited_s = (at[1] - at[0]).total_seconds()
        assert waited_s >= retry_after_s * 0.95


async def test_doshii_400_is_dead_lettered_then_replayed_once_fixed(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        pipeline.sandboxes.faults.set("doshii.put", Fault(status=400, times=-1))
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        await pipeline.settled(channel)
        letters = await dlq.list_dead(pipeline.settings)
        assert len(letters) == 1
        assert letters[0].stage == "pdfs"
        assert "HTTP 400" in letters[0].reason
        assert f"Doshii request {voucher.request_id} is pending" in letters[0].reason
        assert pipeline.sandboxes.doshii.requests[voucher.request_id]["status"] == "pending"

        pipeline.sandboxes.faults.clear("doshii.put")
        assert await dlq.replay(pipeline.settings, letters[0].message_id) == 1
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        assert_activated(pipeline, voucher)
        await pipeline.settled(channel)
    assert await dlq.list_dead(pipeline.settings) == []


async def test_duplicate_ready_gives_one_pdf_one_activation_no_dead_letter(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        await pipeline.doshii_status(voucher, "activated")
        await pipeline.settled(channel)
        assert await pipeline.sandboxes.jackpot.notify(voucher.voucher_id, "READY") == 200
        await pipeline.settled(channel)
        assert pipeline.sandboxes.jackpot.pdf_downloads[voucher.voucher_id] == 1
        assert len(activated_puts(pipeline, voucher)) == 1
        assert_activated(pipeline, voucher)
    assert await dlq.list_dead(pipeline.settings) == []


async def test_amount_mismatch_cancels_voucher_and_request(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        voucher = pipeline.new_voucher(value=110, amount_cents=5000)
        outcome = await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        assert outcome.ready_status is None
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "cancelled"
        assert pipeline.sandboxes.jackpot.confirm_calls[voucher.voucher_id] == 0
        assert pipeline.sandboxes.jackpot.vouchers[voucher.voucher_id]["state"] == "CANCELED"
        reason = pipeline.sandboxes.doshii.requests[voucher.request_id]["cancelledReason"]
        assert "11000" in reason
        assert "5000" in reason
        await pipeline.settled(channel)
    assert await dlq.list_dead(pipeline.settings) == []


async def test_canceled_voucher_cancels_the_doshii_request(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings) as pipeline:
        voucher = pipeline.new_voucher()
        jackpot = pipeline.sandboxes.jackpot
        assert await jackpot.notify(voucher.voucher_id, "RESERVED") == 200
        await jackpot.wait_for_state(voucher.voucher_id, "CONFIRMED")
        jackpot.set_state(voucher.voucher_id, "CANCELED")
        assert await jackpot.notify(voucher.voucher_id) == 200
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "cancelled"
        reason = pipeline.sandboxes.doshii.requests[voucher.request_id]["cancelledReason"]
        assert "CANCELED" in reason


async def test_pdf_link_off_the_allowlist_is_dead_lettered_and_never_fetched(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    server, origin, hits = await counting_server()
    try:
        async with running_pipeline(make_settings) as pipeline:
            voucher = pipeline.new_voucher()
            await pipeline.sandboxes.jackpot.deliver(
                voucher.voucher_id, signed_url=f"{origin}/voucher.pdf?sig=1"
            )
            await pipeline.settled(channel)
            letters = await dlq.list_dead(pipeline.settings)
            assert [letter.stage for letter in letters] == ["pdfs"]
            assert "PDF host not allowed" in letters[0].reason
            assert "sig=1" not in letters[0].reason
            assert pipeline.sandboxes.doshii.requests[voucher.request_id]["status"] == "pending"
    finally:
        await server.cleanup()
    assert hits == []


async def test_worker_killed_mid_message_is_redelivered_and_completed(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel, ledger: Ledger
) -> None:
    async with running_pipeline(make_settings, workers=False) as pipeline:
        settings = pipeline.settings
        env = {**os.environ, **settings_env(settings)}
        # Doshii hangs on the first PUT so the worker is surely mid-message when killed.
        pipeline.sandboxes.faults.set("doshii.put", Fault(delay_s=30, times=1))
        voucher = pipeline.new_voucher()
        first = await start_worker(env)
        try:
            await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)

            async def put_started() -> None:
                while pipeline.sandboxes.faults.calls["doshii.put"] == 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(put_started(), 20)
            first.send_signal(signal.SIGKILL)
            await asyncio.wait_for(first.wait(), 10)
        finally:
            if first.returncode is None:
                first.kill()
        assert pipeline.sandboxes.doshii.requests[voucher.request_id]["status"] == "pending"
        second = await start_worker(env)
        try:
            assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
            assert_activated(pipeline, voucher)
            # The ledger has the voucher once, and each step once, redelivery or not.
            row = await wait_state(ledger, voucher.voucher_id, State.ACTIVATED)
            assert len(await ledger.find(voucher.voucher_id)) == 1
            journey = await ledger.journey(row["voucher_id"])
            assert [(s["stage"], s["outcome"]) for s in journey] == HAPPY
        finally:
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 20) == 0


async def start_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    """`bridge worker all` as a child process of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "worker", "all", env=env
    )


async def test_confirm_mode_notification_never_calls_confirm(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with running_pipeline(make_settings, jackpot_confirm="notification") as pipeline:
        voucher = pipeline.new_voucher()
        # Jackpot treats the ingress's 200 to RESERVED as the agreement and goes on to READY.
        outcome = await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id, force=True)
        assert outcome.ready_status == 200
        assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        await pipeline.settled(channel)
        assert pipeline.sandboxes.jackpot.confirm_calls[voucher.voucher_id] == 0
        assert_activated(pipeline, voucher)
