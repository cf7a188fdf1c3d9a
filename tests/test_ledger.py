"""The ledger against the real PostgreSQL and RabbitMQ, with the sandboxes over HTTP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel

from shared import journal
from shared.journal import State
from shared.ledger import LATEST_VERSION, Ledger, create_pool
from shared.settings import Settings
from shared.topology import Names
from tests.chaos.ledger import check, reckon, record
from tests.support.journeys import HAPPY, outcomes, wait_state
from tests.support.pipeline import Pipeline, Voucher, running_pipeline, settings_env
from tests.support.tcpproxy import POSTGRES_PORT, proxy_to
from workers import dlq
from workers.deps import open_deps
from workers.sweeper import Sweeper

pytestmark = pytest.mark.timeout(180)


async def finished(pipeline: Pipeline, channel: AbstractChannel, *vouchers: Voucher) -> None:
    for voucher in vouchers:
        await pipeline.doshii_status(voucher, "activated", "cancelled")
    await pipeline.settled(channel)


async def test_each_case_leaves_the_journey_it_should(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with running_pipeline(make_settings, ledger=ledger) as pipeline:
        jackpot = pipeline.sandboxes.jackpot
        happy, expired, canceled = (pipeline.new_voucher() for _ in range(3))
        wrong = pipeline.new_voucher(amount_cents=999)
        await jackpot.deliver(happy.voucher_id)
        await jackpot.deliver(expired.voucher_id, expired_link=True)
        await jackpot.deliver(wrong.voucher_id)
        await jackpot.notify(canceled.voucher_id, "RESERVED")
        await jackpot.wait_for_state(canceled.voucher_id, "CONFIRMED")
        jackpot.set_state(canceled.voucher_id, "CANCELED")
        await jackpot.notify(canceled.voucher_id)
        await finished(pipeline, channel, happy, expired, wrong)
        await wait_state(ledger, canceled.voucher_id, State.CANCELLED)
        await pipeline.settled(channel)

        assert await outcomes(ledger, happy) == HAPPY
        assert await outcomes(ledger, expired) == [
            *HAPPY[:3],
            ("pdfs", "link renewed"),
            *HAPPY[3:],
        ]
        assert await outcomes(ledger, wrong) == [
            ("ingress", "received"),
            ("reservations", "rejected"),
            ("doshii", "cancelled"),
        ]
        assert await outcomes(ledger, canceled) == [
            *HAPPY[:3],
            ("lifecycle", "cancelling"),
            ("doshii", "cancelled"),
        ]

        (row,) = await ledger.find(happy.coupon_id)
        assert row["state"] == State.ACTIVATED
        assert row["request_id"] == happy.request_id
        assert row["location_id"] == happy.location_id
        assert row["amount_cents"] == 11000
        assert row["jackpot_value"] == 110
        assert row["doshii_status"] == "activated"
        assert row["pdf_path"].endswith(f"{happy.voucher_id}.pdf")
        assert row["pdf_bytes"] == len(jackpot.pdf(happy.voucher_id))
        assert row["validity_date"] is not None
        (by_request,) = await ledger.find(happy.request_id)
        assert by_request["voucher_id"] == row["voucher_id"]
        # Refused, then the Doshii request cancelled with the reason: the card ends cancelled.
        assert (await ledger.find(wrong.voucher_id))[0]["state"] == State.CANCELLED


async def test_duplicates_and_redeliveries_add_no_second_row_or_step(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with running_pipeline(make_settings, ledger=ledger) as pipeline:
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        await finished(pipeline, channel, voucher)
        for _ in range(3):
            await pipeline.sandboxes.jackpot.notify(voucher.voucher_id)
            await pipeline.sandboxes.jackpot.notify(voucher.voucher_id, "RESERVED")
        await pipeline.settled(channel)
        steps = await outcomes(ledger, voucher)
    # The repeated notifications come back as the same messages: their steps are already there.
    assert steps[: len(HAPPY)] == HAPPY
    extra = steps[len(HAPPY) :]
    # Later stages see the copies; each copy's step is recorded once (same id, stage, outcome).
    assert len(extra) == len(set(extra))
    assert len(await ledger.find(voucher.voucher_id)) == 1
    assert (await ledger.find(voucher.voucher_id))[0]["state"] == State.ACTIVATED


async def test_the_same_steps_written_twice_are_one(settings: Settings, ledger: Ledger) -> None:
    voucher_id = "7f0c1e3a-2b4d-4c5e-8f6a-9b0c1d2e3f40"
    steps = [
        journal.step(
            voucher_id, f"{voucher_id}:READY", "pdfs", "PDF stored", state=State.PDF_STORED
        ),
        journal.step(voucher_id, f"{voucher_id}:READY", "pdfs", "retried", attempt=1),
    ]
    await ledger.record(steps)
    await ledger.record(steps)
    (row,) = await ledger.find(voucher_id)
    assert len(await ledger.journey(row["voucher_id"])) == 2
    assert row["state"] == State.PDF_STORED
    # An earlier step arriving late does not move the state back.
    earlier = journal.step(
        voucher_id, f"{voucher_id}:RESERVED", "ingress", "received", at_ms=1, state=State.RESERVED
    )
    await ledger.record([earlier])
    (row,) = await ledger.find(voucher_id)
    assert row["state"] == State.PDF_STORED
    assert row["first_seen"] == earlier.at
    # Nor does a notification that comes later than a step further along (Jackpot repeating
    # RESERVED or READY), written in a batch of its own: it only joins the journey.
    for state in (State.RESERVED, State.READY):
        late = journal.step(
            voucher_id, f"{voucher_id}:{state}:late", "ingress", "received", state=state
        )
        await ledger.record([late])
        (row,) = await ledger.find(voucher_id)
        assert row["state"] == State.PDF_STORED
        assert row["last_change"] == late.at
    assert len(await ledger.journey(row["voucher_id"])) == 5
    # A later step that is not a notification still moves it on.
    activated = journal.step(
        voucher_id, f"{voucher_id}:doshii", "doshii", "activated", state=State.ACTIVATED
    )
    await ledger.record([activated])
    (row,) = await ledger.find(voucher_id)
    assert row["state"] == State.ACTIVATED


async def test_postgres_away_for_20_s_loses_no_activation_and_no_step(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
    settings: Settings,
) -> None:
    database_url = settings.database_url.get_secret_value()
    async with proxy_to(database_url, POSTGRES_PORT) as proxy:
        cut_settings = make_settings(database_url=proxy.url_through(database_url))
        async with (
            Ledger.open(cut_settings) as through_proxy,
            running_pipeline(make_settings, ledger=through_proxy) as pipeline,
        ):
            vouchers = [pipeline.new_voucher() for _ in range(60)]
            await proxy.cut()
            cut_at = asyncio.get_running_loop().time()
            await asyncio.gather(
                *(pipeline.sandboxes.jackpot.deliver(v.voucher_id) for v in vouchers)
            )
            statuses = await asyncio.gather(
                *(pipeline.doshii_status(v, "activated", "cancelled") for v in vouchers)
            )
            # Every voucher activated while the ledger could not be written.
            assert statuses == ["activated"] * 60
            assert await ledger.find(vouchers[0].voucher_id) == []
            await asyncio.sleep(max(0.0, 20 - (asyncio.get_running_loop().time() - cut_at)))
            await proxy.restore()
            restored = time.monotonic()
            for voucher in vouchers:
                await wait_state(ledger, voucher.voucher_id, State.ACTIVATED, timeout_s=60)
            caught_up_s = time.monotonic() - restored
            await pipeline.settled(channel)
            letters = await dlq.list_dead(pipeline.settings)
    complete = [v for v in vouchers if await outcomes(ledger, v) == HAPPY]
    scenario = "L1. PostgreSQL cut 20 s, 60 vouchers"
    cut = reckon(scenario, vouchers, pipeline.sandboxes, letters, caught_up_s)
    record(
        cut,
        extra_notes=[
            f"ledger complete for {len(complete)} of {len(vouchers)}, "
            f"{caught_up_s:.1f} s after PostgreSQL came back"
        ],
    )
    check(cut)
    assert len(complete) == len(vouchers)


def sweep_settings(make_settings: Callable[..., Settings], **extra: Any) -> dict[str, Any]:
    return {"sweep_ready_after_s": 0.5, "sweep_give_up_s": 3.0, "sweep_interval_s": 0.2, **extra}


async def test_sweeper_finishes_a_voucher_whose_ready_never_came(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with running_pipeline(
        make_settings, ledger=ledger, **sweep_settings(make_settings)
    ) as pipeline:
        jackpot = pipeline.sandboxes.jackpot
        lost, never = pipeline.new_voucher(), pipeline.new_voucher()
        for voucher in (lost, never):
            await jackpot.notify(voucher.voucher_id, "RESERVED")
            await jackpot.wait_for_state(voucher.voucher_id, "CONFIRMED")
            await wait_state(ledger, voucher.voucher_id, State.CONFIRMED)
        # Jackpot made the first one READY but its notification was lost; the second never is.
        jackpot.set_state(lost.voucher_id, "READY")
        jackpot.pdf_not_ready.add(never.voucher_id)
        began = time.monotonic()
        async with open_deps(pipeline.settings) as deps:
            sweeper = Sweeper(pipeline.settings, ledger, deps)
            stop = asyncio.Event()
            sweeping = asyncio.create_task(sweeper.run(stop))
            try:
                assert await pipeline.doshii_status(lost, "activated", "cancelled") == "activated"
                await wait_state(ledger, lost.voucher_id, State.ACTIVATED)
                row = await wait_state(ledger, never.voucher_id, State.DEAD, timeout_s=30)
            finally:
                stop.set()
                await sweeping
        await pipeline.settled(channel)
        assert pipeline.sandboxes.doshii.requests[never.request_id]["status"] == "pending"
        lost_steps = await outcomes(ledger, lost)
        assert lost_steps[:4] == [*HAPPY[:2], ("sweeper", "link found"), ("sweeper", "received")]
        assert lost_steps[-2:] == HAPPY[-2:]
        never_steps = await outcomes(ledger, never)
        assert ("sweeper", "not ready yet") in never_steps
        assert never_steps[-1] == ("sweeper", "dead-lettered")
        assert row["checks"] >= 1
        (letter,) = await dlq.list_dead(pipeline.settings)
        assert letter.voucher_id == never.voucher_id
        assert "still has no PDF" in letter.reason
        assert "bridge dlq replay" in letter.reason
        # Once Jackpot has the PDF, the operator's replay finishes it.
        jackpot.pdf_not_ready.discard(never.voucher_id)
        jackpot.set_state(never.voucher_id, "READY")
        assert await dlq.replay(pipeline.settings, letter.message_id) == 1
        assert await pipeline.doshii_status(never, "activated", "cancelled") == "activated"
        await wait_state(ledger, never.voucher_id, State.ACTIVATED)
        assert ("dlq", "replayed") in await outcomes(ledger, never)
        await pipeline.settled(channel)
        letters = await dlq.list_dead(pipeline.settings)
        swept = reckon(
            "L2. READY lost / never READY: sweeper, then replay",
            [lost, never],
            pipeline.sandboxes,
            letters,
            time.monotonic() - began,
        )
        record(
            swept,
            extra_notes=[
                "one finished as READY by the sweeper; one dead-lettered "
                "after the give-up time, replayed once Jackpot had its PDF"
            ],
        )
        check(swept)


async def test_two_sweepers_act_once(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with running_pipeline(
        make_settings, ledger=ledger, **sweep_settings(make_settings, sweep_give_up_s=3600)
    ) as pipeline:
        jackpot = pipeline.sandboxes.jackpot
        vouchers = [pipeline.new_voucher() for _ in range(5)]
        for voucher in vouchers:
            await jackpot.notify(voucher.voucher_id, "RESERVED")
        for voucher in vouchers:
            await wait_state(ledger, voucher.voucher_id, State.CONFIRMED)
            jackpot.set_state(voucher.voucher_id, "READY")
        await asyncio.sleep(0.6)  # past BRIDGE_SWEEP_READY_AFTER_S
        began = time.monotonic()
        async with open_deps(pipeline.settings) as deps:
            first = Sweeper(pipeline.settings, ledger, deps)
            second = Sweeper(pipeline.settings, ledger, deps)
            reports = await asyncio.gather(first.sweep(), second.sweep(), first.sweep())
        for voucher in vouchers:
            assert await pipeline.doshii_status(voucher, "activated", "cancelled") == "activated"
        await pipeline.settled(channel)
        assert sum(r.outcomes.get("finished as READY", 0) for r in reports) == 5
        assert [r.acted for r in reports].count(True) >= 1
        letters = await dlq.list_dead(pipeline.settings)
        twice = reckon(
            "L3. two sweepers, 5 vouchers without READY",
            vouchers,
            pipeline.sandboxes,
            letters,
            time.monotonic() - began,
        )
        record(twice, extra_notes=[f"sweeps that acted: {[r.acted for r in reports]}"])
        check(twice)
        for voucher in vouchers:
            steps = await outcomes(ledger, voucher)
            assert steps.count(("sweeper", "link found")) == 1
            assert jackpot.signedurl_calls[voucher.voucher_id] == 1
            assert steps.count(("pdfs", "activated")) == 1


async def test_paid_voucher_on_a_card_cancelled_at_the_till_is_raised_for_refund(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with running_pipeline(
        make_settings, ledger=ledger, **sweep_settings(make_settings, sweep_audit_every_s=0.1)
    ) as pipeline:
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        await finished(pipeline, channel, voucher)
        await wait_state(ledger, voucher.voucher_id, State.ACTIVATED)
        async with open_deps(pipeline.settings) as deps:
            sweeper = Sweeper(pipeline.settings, ledger, deps)
            assert (await sweeper.sweep()).outcomes == {}  # audited: still activated
            pipeline.sandboxes.doshii.requests[voucher.request_id]["status"] = "cancelled"
            await asyncio.sleep(0.2)
            assert (await sweeper.sweep()).outcomes == {"refund needed": 1}
            await asyncio.sleep(0.2)
            assert (await sweeper.sweep()).outcomes == {}  # raised once, not again
    (row,) = await ledger.find(voucher.voucher_id)
    assert row["state"] == State.REFUND_NEEDED
    (letter,) = await dlq.list_dead(pipeline.settings)
    assert letter.reason.startswith("paid voucher, cancelled card")
    assert "refund it by hand" in letter.reason
    # Nothing to replay: the letter stays for a person.
    assert await dlq.replay(pipeline.settings, None) == 0


async def test_reservation_never_confirmed_expires_and_cancels_the_request(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    async with running_pipeline(make_settings, ledger=ledger) as pipeline:
        voucher = pipeline.new_voucher()
        past = datetime.now(UTC) - timedelta(minutes=1)
        await ledger.record(
            [
                journal.step(
                    voucher.voucher_id,
                    f"{voucher.voucher_id}:RESERVED",
                    "ingress",
                    "received",
                    state=State.RESERVED,
                    facts={
                        "coupon_id": voucher.coupon_id,
                        "location_id": voucher.location_id,
                        "request_id": voucher.request_id,
                        "amount_cents": 11000,
                        "resa_expire_date": past.isoformat(),
                    },
                )
            ]
        )
        async with open_deps(pipeline.settings) as deps:
            report = await Sweeper(pipeline.settings, ledger, deps).sweep()
        assert report.outcomes == {"expired": 1}
        assert await pipeline.doshii_status(voucher, "cancelled", "activated") == "cancelled"
        await wait_state(ledger, voucher.voucher_id, State.CANCELLED)
        record = pipeline.sandboxes.doshii.requests[voucher.request_id]
        assert "expired before it was confirmed" in record["cancelledReason"]
        steps = await outcomes(ledger, voucher)
        assert steps[1:] == [("sweeper", "expired"), ("doshii", "cancelled")]


async def test_the_ledger_holds_no_key_secret_or_signed_link(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
    settings: Settings,
) -> None:
    async with running_pipeline(make_settings, ledger=ledger) as pipeline:
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id, expired_link=True)
        await finished(pipeline, channel, voucher)
        await wait_state(ledger, voucher.voucher_id, State.ACTIVATED)
    rows = []
    async with ledger.pool.acquire() as connection:
        for table in ("vouchers", "journey"):
            rows += await connection.fetch(f"SELECT * FROM {table}")
    dump = " ".join(str(dict(row)) for row in rows)
    assert voucher.coupon_id in dump
    for secret in (
        voucher.key,
        *(s.get_secret_value() for s in settings.key_secrets),
        "signature=",
        "expires=",
        "jackpot-test-key",
    ):
        assert secret not in dump


async def test_old_schema_and_unreachable_database_refuse_to_start(
    make_settings: Callable[..., Settings], settings: Settings, tmp_path: Any
) -> None:
    pool = await create_pool(settings, max_size=1)
    try:
        await pool.execute(f'CREATE SCHEMA "{settings.database_schema}"')
        env = {**os.environ, **settings_env(settings)}
        old = _bridge(["worker", "ledger"], env)
        assert old.returncode == 2
        assert "schema version 0" in old.stderr
        assert "bridge db upgrade" in old.stderr
        upgraded = _bridge(["db", "upgrade"], env)
        assert upgraded.returncode == 0, upgraded.stderr
        assert f"schema version {LATEST_VERSION}" in upgraded.stdout
        again = _bridge(["db", "upgrade"], env)
        assert "applied" not in again.stdout
        assert again.returncode == 0
        unreachable = _bridge(
            ["worker", "ledger"],
            {**env, "BRIDGE_DATABASE_URL": "postgresql://bridge:secret-pw@127.0.0.1:9/bridge"},
        )
        assert unreachable.returncode == 2
        assert "BRIDGE_DATABASE_URL: 127.0.0.1:9/bridge" in unreachable.stderr
        assert "secret-pw" not in unreachable.stderr
        assert "Traceback" not in unreachable.stderr
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
        await pool.close()


def _bridge(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_status_and_vouchers_show_the_journey(
    make_settings: Callable[..., Settings],
    broker: Names,
    channel: AbstractChannel,
    ledger: Ledger,
    settings: Settings,
) -> None:
    async with running_pipeline(make_settings, ledger=ledger) as pipeline:
        voucher = pipeline.new_voucher()
        await pipeline.sandboxes.jackpot.deliver(voucher.voucher_id)
        await finished(pipeline, channel, voucher)
        await wait_state(ledger, voucher.voucher_id, State.ACTIVATED)
    env = {**os.environ, **settings_env(settings)}
    for ident in (voucher.coupon_id, voucher.voucher_id, voucher.request_id):
        shown = _bridge(["status", ident], env)
        assert shown.returncode == 0, shown.stderr
        assert "state: activated" in shown.stdout
        lines = shown.stdout.splitlines()
        order = ["received", "confirmed", "received", "PDF stored", "activated"]
        positions = [
            next(i for i, line in enumerate(lines) if f" {word}" in line and i > 4)
            for word in dict.fromkeys(order)
        ]
        assert positions == sorted(positions)
        assert "to do" not in shown.stdout
    missing = _bridge(["status", "NOSUCHCOUPON"], env)
    assert missing.returncode == 1
    assert "knows no voucher" in missing.stdout
    listed = _bridge(["vouchers", "--state", "activated", "--json"], env)
    assert voucher.coupon_id in listed.stdout
    assert _bridge(["vouchers", "--stuck"], env).stdout.strip() == "no vouchers"
    bad = _bridge(["vouchers", "--since", "soon"], env)
    assert bad.returncode == 2
    assert "is not a duration" in bad.stderr


async def test_a_journal_message_that_is_not_one_is_dead_lettered(
    settings: Settings, broker: Names, channel: AbstractChannel, ledger: Ledger
) -> None:
    import aio_pika

    from workers.ledger import LedgerWriter
    from workers.runner import Runner

    exchange = await channel.get_exchange(broker.journal)
    await exchange.publish(aio_pika.Message(b"not steps", message_id="junk"), routing_key="")
    good = journal.step("7f0c1e3a-2b4d-4c5e-8f6a-9b0c1d2e3f41", "m", "pdfs", "PDF stored")
    await exchange.publish(aio_pika.Message(journal.encode([good])), routing_key="")
    runner = Runner(settings, {}, consumers=[LedgerWriter(settings, ledger)])
    await asyncio.wait_for(runner.run(asyncio.Event(), drain=True), 30)
    assert len(await ledger.find(str(good.voucher_id))) == 1
    (letter,) = await dlq.list_dead(settings)
    assert letter.message_id == "junk"
