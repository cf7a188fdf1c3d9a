"""Fault scenarios through the real pipeline: each sends known vouchers and ends with a ledger.

The sandboxes run in this process; the ingress and the workers run as `python -m bridge
ingress` and `python -m bridge worker all`, on the real broker (through a TcpProxy where the
scenario cuts it). Every scenario asserts that nothing accepted was lost and that Doshii never
got contradicting updates, then what is particular to its fault. The ledger table is printed at
the end of the run and written to var/chaos-latest.md.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from sandbox.faults import Fault
from sandbox.jackpot import DeliverOutcome, JackpotSandbox
from sandbox.server import Sandboxes, start_sandboxes
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.chaos.harness import (
    TIERS_S,
    Bridge,
    Finish,
    Senders,
    free_port,
    open_bridge,
    wait_until,
    wait_until_async,
)
from tests.chaos.ledger import Ledger, check, reckon, record
from tests.conftest import AMQP_URL
from tests.support.balancer import Balancer
from tests.support.pipeline import Pipeline, Voucher
from tests.support.tcpproxy import TcpProxy
from workers.runner import QUICK_RETRY_BUDGET_S

pytestmark = pytest.mark.chaos

BROKER = urlsplit(AMQP_URL)
BROKER_HOST = BROKER.hostname or "127.0.0.1"
BROKER_PORT = BROKER.port or 5672

# The broker outage of scenario 1: its length is the spec.
CUT_S = 30.0
# The partner outages of scenario 4.
OUTAGE_S = 20.0
# A message first failing at an outage's start is tried again until at least sum(TIERS_S) later
# (each tier is a TTL it waits out), plus its quick retries: that must outlast the outage.
assert sum(TIERS_S) > OUTAGE_S + QUICK_RETRY_BUDGET_S
# Scenario 5: Doshii holds each PUT HANG_S, the bridge gives up on a call after PARTNER_TIMEOUT_S,
# for HANG_WINDOW_S.
HANG_S = 3.0
PARTNER_TIMEOUT_S = 1.0
HANG_WINDOW_S = 10.0
RSS_GROWTH_MAX_MB = 100.0
# How long Jackpot waits for the bridge to confirm before sending READY: past any outage here.
CONFIRM_WAIT_S = 150.0


def deliveries(
    jackpot: JackpotSandbox, vouchers: Sequence[Voucher]
) -> list[Callable[[], Coroutine[Any, Any, DeliverOutcome]]]:
    """Jackpot delivering each voucher (RESERVED, then READY), each started when called."""
    return [
        functools.partial(jackpot.deliver, v.voucher_id, confirm_timeout_s=CONFIRM_WAIT_S)
        for v in vouchers
    ]


# Bounds on a scenario's phases.
SEND_TIMEOUT_S = 200.0
SETTLE_TIMEOUT_S = 90.0


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Straight to the broker, with the scenarios' tiers: `broker` declares and deletes them all."""
    return make_settings(retry_tiers_s=",".join(map(str, TIERS_S)))


@dataclass
class Kit:
    """What every scenario needs from the fixtures."""

    make_settings: Callable[..., Settings]
    admin: Settings
    channel: AbstractChannel
    logs: Path

    def bridge(self, sandboxes: Sandboxes, **overrides: Any) -> AbstractAsyncContextManager[Bridge]:
        return open_bridge(
            self.make_settings, self.admin, sandboxes, self.channel, self.logs, **overrides
        )


@pytest.fixture
def kit(
    make_settings: Callable[..., Settings],
    settings: Settings,
    broker: Names,
    channel: AbstractChannel,
    tmp_path: Path,
) -> Kit:
    logs = tmp_path / "logs"
    logs.mkdir()
    return Kit(make_settings, settings, channel, logs)


@pytest.fixture
async def sandboxes() -> AsyncIterator[Sandboxes]:
    async with await start_sandboxes() as started:
        yield started


def accepted(sandboxes: Sandboxes, vouchers: Sequence[Voucher]) -> int:
    ids = {v.voucher_id for v in vouchers}
    return len(
        {
            d.voucher_id
            for d in sandboxes.jackpot.deliveries
            if d.voucher_id in ids and d.status == 200
        }
    )


async def conclude(
    bridge: Bridge,
    scenario: str,
    vouchers: Sequence[Voucher],
    cleared_at: float,
    *,
    notes: Sequence[str] = (),
    at_settled: Callable[[], list[str]] | None = None,
) -> tuple[Ledger, Finish]:
    """Wait for the pipeline to settle, stop it, and record the scenario's ledger.

    `cleared_at` (time.monotonic) is when the fault ended: the drain is timed from there.
    """
    settled = await bridge.settle(vouchers, SETTLE_TIMEOUT_S)
    drain_s = time.monotonic() - cleared_at if settled else None
    late_notes = at_settled() if at_settled is not None else []
    finish = await bridge.finish()
    ledger = reckon(scenario, vouchers, bridge.sandboxes, finish.letters, drain_s)
    record(ledger, extra_notes=[*notes, *late_notes])
    return ledger, finish


def check_finish(finish: Finish) -> None:
    """Stopped cleanly, and nothing left behind in a queue, a tier or the spool."""
    assert not finish.crashes, "\n".join(finish.crashes)
    assert finish.held == {}, f"messages still held after the workers stopped: {finish.held}"
    assert finish.spooled == 0, f"{finish.spooled} notifications left in the spool"
    assert finish.worker_codes, "no worker was running at the end"
    assert all(code == 0 for code in finish.worker_codes), finish.worker_codes
    assert all(code == 0 for code in finish.ingress_codes), finish.ingress_codes
    assert finish.ingress_readiness == ["ready"], finish.ingress_readiness


def delivered_fully(outcomes: Sequence[DeliverOutcome]) -> None:
    """Jackpot got a 200 for every RESERVED and READY it sent."""
    bad = [o for o in outcomes if (o.reserved_status, o.ready_status) != (200, 200)]
    assert not bad, f"{len(bad)} deliveries did not end with two 200s: {bad[:3]}"


@pytest.mark.timeout(240)
async def test_broker_cut_for_30_s_under_load(kit: Kit, sandboxes: Sandboxes) -> None:
    """Ingress and workers reach the broker through one proxy, cut for 30 s while vouchers
    keep arriving: the ingress answers 200 from its spool, the workers reconnect, all drains."""
    scenario = "1. broker cut 30 s under load"
    jackpot, faults = sandboxes.jackpot, sandboxes.faults
    async with (
        TcpProxy(BROKER_HOST, BROKER_PORT) as proxy,
        kit.bridge(sandboxes, amqp_url=proxy.amqp_url()) as bridge,
    ):
        await bridge.start_ingress()
        worker = await bridge.start_worker()
        burst = [bridge.pipeline.new_voucher() for _ in range(12)]
        steady = [bridge.pipeline.new_voucher() for _ in range(48)]
        vouchers = [*burst, *steady]
        senders = Senders()
        # Doshii is a little slow for the burst, so the cut finds the worker holding messages.
        faults.set("doshii.put", Fault(delay_s=1.0, times=-1))
        for v in burst:
            senders.start(jackpot.deliver(v.voucher_id, confirm_timeout_s=CONFIRM_WAIT_S))
        starts = deliveries(jackpot, steady)
        # ~34 s of steady load: it runs through the whole cut and past it.
        load = asyncio.create_task(senders.paced(starts, every_s=0.7))
        try:
            await wait_until(
                lambda: faults.calls["doshii.put"] >= 6, 30, "Doshii updates before the cut"
            )
            await proxy.cut()
            cut_at = time.time()
            faults.clear("doshii.put")
            started = len(senders.tasks)
            mid_way = len(bridge.open_vouchers(vouchers[:started]))
            await asyncio.sleep(CUT_S)  # the outage itself
            spooled_at_restore = bridge.spool_depth()
            sent_during = len(senders.tasks) - started
            restored_at = time.time()
            await proxy.restore()
            cleared = time.monotonic()
            notes = [
                f"{started} vouchers started before the cut ({mid_way} of them unfinished when "
                f"it came), {sent_during} during it",
                f"{spooled_at_restore} notifications in the spool when the broker came back",
            ]
            crash = worker.crash_report() if worker.crashed else None
            if crash is not None:
                # Finish the ledger as a supervisor would (compose: restart unless-stopped);
                # the crash itself fails the test below.
                worker.told_to_exit = True
                notes.append("the worker process DIED during the cut; restarted to finish")
                await bridge.start_worker()
            await asyncio.wait_for(load, SEND_TIMEOUT_S)
            outcomes = await senders.wait(SEND_TIMEOUT_S)
            ledger, finish = await conclude(bridge, scenario, vouchers, cleared, notes=notes)
        finally:
            load.cancel()
            await senders.cancel()
    refused = [d for d in jackpot.deliveries if cut_at <= d.at_s <= restored_at and d.status != 200]
    check(ledger)
    check_finish(finish)
    delivered_fully(outcomes)
    assert ledger.activated == len(vouchers)
    assert sent_during > 0
    assert spooled_at_restore > 0, "the ingress did not spool during the cut"
    assert refused == [], f"the ingress refused {len(refused)} notifications during the cut"
    assert crash is None, f"the worker died during the broker cut instead of reconnecting: {crash}"


async def test_worker_sigkilled_mid_batch_then_restarted(kit: Kit, sandboxes: Sandboxes) -> None:
    """Doshii is slow, so the worker holds messages at every stage when it is SIGKILLed; a new
    worker gets them all redelivered and completes them."""
    scenario = "2. worker SIGKILLed mid-batch"
    jackpot, faults = sandboxes.jackpot, sandboxes.faults
    async with kit.bridge(sandboxes, partner_timeout_s=10.0) as bridge:
        await bridge.start_ingress()
        first = await bridge.start_worker()
        faults.set("doshii.put", Fault(delay_s=3.0, times=-1))
        vouchers = [bridge.pipeline.new_voucher() for _ in range(40)]
        senders = Senders()
        try:
            for v in vouchers:
                senders.start(jackpot.deliver(v.voucher_id, confirm_timeout_s=CONFIRM_WAIT_S))
            await wait_until(lambda: faults.calls["doshii.put"] >= 8, 60, "Doshii PUTs in flight")
            in_flight = await bridge.worker_in_flight()
            unfinished = len(bridge.open_vouchers(vouchers))
            code = await first.kill()
            faults.clear("doshii.put")
            cleared = time.monotonic()
            await bridge.start_worker()
            outcomes = await senders.wait(SEND_TIMEOUT_S)
            ledger, finish = await conclude(
                bridge,
                scenario,
                vouchers,
                cleared,
                notes=[
                    f"killed holding {in_flight} messages, {unfinished} vouchers unfinished",
                ],
            )
        finally:
            await senders.cancel()
    check(ledger)
    check_finish(finish)
    delivered_fully(outcomes)
    assert code == -signal.SIGKILL
    assert in_flight, "the worker held no message when it was killed"
    assert ledger.activated == len(vouchers)


async def test_ingress_sigkilled_while_spooling(kit: Kit, sandboxes: Sandboxes) -> None:
    """The broker is cut, so the ingress spools; it is SIGKILLed with notifications arriving.
    A new ingress on the same port and spool root, broker back, adopts the dead one's folder and
    drains what was left, and Jackpot's retries of what the dead one never answered land on it."""
    scenario = "3. ingress SIGKILLed while spooling"
    jackpot = sandboxes.jackpot
    async with (
        TcpProxy(BROKER_HOST, BROKER_PORT) as proxy,
        kit.bridge(sandboxes, amqp_url=proxy.amqp_url()) as bridge,
    ):
        first = await bridge.start_ingress()
        await bridge.start_worker(amqp_url=AMQP_URL)  # only the ingress loses the broker
        await proxy.cut()
        await wait_until_async(
            lambda: _status_is(bridge, "degraded"), 20, "the ingress to notice the cut"
        )
        vouchers = [bridge.pipeline.new_voucher() for _ in range(40)]
        senders = Senders()
        starts = deliveries(jackpot, vouchers)
        load = asyncio.create_task(senders.paced(starts, every_s=0.1))
        try:
            await wait_until(
                lambda: accepted(sandboxes, vouchers) >= 15, 30, "15 notifications spooled"
            )
            code = await first.kill()
            killed_at = time.time()
            spooled_at_kill = bridge.spool_depth()
            accepted_at_kill = accepted(sandboxes, vouchers)
            await proxy.restore()
            cleared = time.monotonic()
            await bridge.start_ingress(statuses=("ready", "degraded"))
            await asyncio.wait_for(load, SEND_TIMEOUT_S)
            outcomes = await senders.wait(SEND_TIMEOUT_S)
            unanswered = [d for d in jackpot.deliveries if d.status == 0 and d.at_s >= killed_at]
            ledger, finish = await conclude(
                bridge,
                scenario,
                vouchers,
                cleared,
                notes=[
                    f"killed after {accepted_at_kill} vouchers accepted, {spooled_at_kill} "
                    "notifications in its spool",
                    f"{len(unanswered)} notification attempts unanswered while it was down, "
                    "retried by Jackpot",
                ],
            )
        finally:
            load.cancel()
            await senders.cancel()
    check(ledger)
    check_finish(finish)
    delivered_fully(outcomes)
    assert code == -signal.SIGKILL
    assert spooled_at_kill > 0, "nothing was in the spool when the ingress was killed"
    assert ledger.activated == len(vouchers)


async def _status_is(bridge: Bridge, status: str) -> bool:
    return await bridge.ingress_status() == status


async def test_doshii_500_then_429_and_signed_links_down_for_20_s(
    kit: Kit, sandboxes: Sandboxes
) -> None:
    """For 20 s Doshii answers 500 (then 429 with Retry-After) to every update, and Jackpot's
    signed-link endpoint drops every call while half the vouchers come with expired links.
    Retries and delay tiers outlast both: every voucher is activated, nothing dead-lettered."""
    scenario = "4. Doshii 500/429 + signedurl down 20 s"
    jackpot, faults = sandboxes.jackpot, sandboxes.faults
    retry_after_s = 2.0
    async with kit.bridge(sandboxes) as bridge:
        await bridge.start_ingress()
        await bridge.start_worker()
        vouchers = [bridge.pipeline.new_voucher() for _ in range(40)]
        expired = {v.voucher_id for v in vouchers[::2]}
        faults.set("doshii.put", Fault(status=500, times=-1))
        faults.set("jackpot.signedurl", Fault(drop=True, times=-1))
        senders = Senders()
        starts = [
            lambda v=v: jackpot.deliver(
                v.voucher_id,
                expired_link=v.voucher_id in expired,
                confirm_timeout_s=CONFIRM_WAIT_S,
            )
            for v in vouchers
        ]
        load = asyncio.create_task(senders.paced(starts, every_s=0.1))
        try:
            await asyncio.sleep(OUTAGE_S / 2)  # the outage's first half: 500s
            faults.set("doshii.put", Fault(status=429, retry_after_s=retry_after_s, times=-1))
            await asyncio.sleep(OUTAGE_S / 2)  # its second half: 429s
            faults.clear()
            cleared = time.monotonic()
            await asyncio.wait_for(load, SEND_TIMEOUT_S)
            outcomes = await senders.wait(SEND_TIMEOUT_S)
            ledger, finish = await conclude(
                bridge,
                scenario,
                vouchers,
                cleared,
                notes=[
                    f"injected: {faults.injected['doshii.put']} Doshii update failures, "
                    f"{faults.injected['jackpot.signedurl']} signed-link calls dropped",
                ],
            )
        finally:
            load.cancel()
            await senders.cancel()
    check(ledger)
    check_finish(finish)
    delivered_fully(outcomes)
    assert ledger.activated == len(vouchers)
    statuses = {p["status"] for v in vouchers for p in sandboxes.doshii.puts[v.request_id]}
    assert {500, 429} <= statuses, f"the Doshii faults were not exercised: {statuses}"
    assert faults.injected["jackpot.signedurl"] > 0, "no link renewal met the outage"
    assert all(jackpot.signedurl_calls[vid] >= 1 for vid in expired), "an expired link was used"
    early = retried_sooner_than(sandboxes, vouchers, 429, retry_after_s * 0.95)
    assert early == [], f"Retry-After ignored: {early[:5]}"


def retried_sooner_than(
    sandboxes: Sandboxes, vouchers: Sequence[Voucher], status: int, min_gap_s: float
) -> list[str]:
    """Requests whose PUT after a `status` answer came sooner than `min_gap_s`."""
    early = []
    for voucher in vouchers:
        puts = sandboxes.doshii.puts[voucher.request_id]
        at = [datetime.fromisoformat(str(p["at"])) for p in puts]
        for index in range(1, len(puts)):
            gap_s = (at[index] - at[index - 1]).total_seconds()
            if puts[index - 1]["status"] == status and gap_s < min_gap_s:
                early.append(f"{voucher.request_id}: {gap_s:.2f} s")
    return early


async def test_doshii_hanging_longer_than_the_partner_timeout(
    kit: Kit, sandboxes: Sandboxes
) -> None:
    """Doshii holds every update 3 s against a 1 s timeout, for a while: the calls time out,
    messages go through the delay tiers instead of waiting, none is held for ever, and the
    worker's memory stays bounded."""
    scenario = "5. Doshii hangs past the timeout"
    jackpot, faults = sandboxes.jackpot, sandboxes.faults
    async with kit.bridge(sandboxes, partner_timeout_s=PARTNER_TIMEOUT_S) as bridge:
        await bridge.start_ingress()
        worker = await bridge.start_worker()
        rss_before = worker.rss_mb()
        faults.set("doshii.put", Fault(delay_s=HANG_S, times=-1))
        vouchers = [bridge.pipeline.new_voucher() for _ in range(50)]
        senders = Senders()
        starts = deliveries(jackpot, vouchers)
        load = asyncio.create_task(senders.paced(starts, every_s=0.05))
        rss: dict[str, float] = {"before": rss_before}
        try:
            await wait_until(lambda: faults.calls["doshii.put"] > 0, 30, "a hanging Doshii PUT")
            await asyncio.sleep(HANG_WINDOW_S)  # Doshii hangs this long
            rss["during"] = worker.rss_mb()
            faults.clear("doshii.put")
            cleared = time.monotonic()
            await asyncio.wait_for(load, SEND_TIMEOUT_S)
            outcomes = await senders.wait(SEND_TIMEOUT_S)

            def at_settled() -> list[str]:
                rss["after"] = worker.rss_mb()
                growth = rss["after"] - rss["before"]
                sizes = ", ".join(f"{k} {v:.1f} MB" for k, v in rss.items())
                return [f"worker RSS {sizes} (growth {growth:+.1f} MB)"]

            ledger, finish = await conclude(
                bridge,
                scenario,
                vouchers,
                cleared,
                notes=[f"{timed_out(sandboxes, vouchers)} Doshii updates timed out (hung up on)"],
                at_settled=at_settled,
            )
        finally:
            load.cancel()
            await senders.cancel()
    check(ledger, dead_allowed=True)
    check_finish(finish)  # no message held: every timeout let go of its message
    delivered_fully(outcomes)
    for letter in ledger.letters:
        assert letter.reason.startswith("gave up after"), letter.reason
    assert timed_out(sandboxes, vouchers) > 0, "no Doshii call timed out"
    assert rss["after"] - rss["before"] < RSS_GROWTH_MAX_MB, rss


def timed_out(sandboxes: Sandboxes, vouchers: Sequence[Voucher]) -> int:
    """Doshii PUTs whose caller hung up before the answer (a timeout, here)."""
    puts = sandboxes.doshii.puts
    return sum(1 for v in vouchers for p in puts.get(v.request_id, []) if p["status"] == 0)


async def test_duplicate_and_out_of_order_notifications(kit: Kit, sandboxes: Sandboxes) -> None:
    """READY sent twice at once, READY before RESERVED, CANCELED sent twice: every voucher ends
    activated (or cancelled) exactly once, with no dead letter."""
    scenario = "6. duplicates and out of order"
    jackpot = sandboxes.jackpot
    async with kit.bridge(sandboxes) as bridge:
        await bridge.start_ingress()
        await bridge.start_worker()
        twice = [bridge.pipeline.new_voucher() for _ in range(20)]
        early = [bridge.pipeline.new_voucher() for _ in range(20)]
        ended = [bridge.pipeline.new_voucher() for _ in range(10)]
        vouchers = [*twice, *early, *ended]

        async def confirmed(voucher: Voucher) -> None:
            assert await jackpot.notify(voucher.voucher_id, "RESERVED") == 200
            await jackpot.wait_for_state(voucher.voucher_id, "CONFIRMED", timeout_s=60)

        async def ready_twice(voucher: Voucher) -> list[int]:
            await confirmed(voucher)
            jackpot.set_state(voucher.voucher_id, "READY")
            return list(await asyncio.gather(*(jackpot.notify(voucher.voucher_id) for _ in "ab")))

        async def ready_before_reserved(voucher: Voucher) -> list[int]:
            jackpot.set_state(voucher.voucher_id, "READY")
            first = await jackpot.notify(voucher.voucher_id, "READY")
            return [first, await jackpot.notify(voucher.voucher_id, "RESERVED")]

        async def canceled_twice(voucher: Voucher) -> list[int]:
            await confirmed(voucher)
            jackpot.set_state(voucher.voucher_id, "CANCELED")
            return list(await asyncio.gather(*(jackpot.notify(voucher.voucher_id) for _ in "ab")))

        senders = Senders()
        started = time.monotonic()
        try:
            for v in twice:
                senders.start(ready_twice(v))
            for v in early:
                senders.start(ready_before_reserved(v))
            for v in ended:
                senders.start(canceled_twice(v))
            answers = await senders.wait(SEND_TIMEOUT_S)
            ledger, finish = await conclude(bridge, scenario, vouchers, started)
        finally:
            await senders.cancel()
    check(ledger)
    check_finish(finish)
    assert all(status == 200 for statuses in answers for status in statuses), answers
    assert ledger.activated == len(twice) + len(early)
    assert ledger.cancelled == len(ended)
    requests = sandboxes.doshii.requests
    assert all(requests[v.request_id]["status"] == "cancelled" for v in ended)
    for voucher in [*twice, *early]:
        record_ = requests[voucher.request_id]
        assert record_["reference"] == voucher.coupon_id
        assert record_["amount"] == "11000"


# Scenario 7: how often the survivor looks for a dead replica's spool folder (default 10 s).
ADOPT_INTERVAL_S = 1.0


@pytest.mark.timeout(240)
async def test_two_ingresses_one_sigkilled_while_both_spool(kit: Kit, sandboxes: Sandboxes) -> None:
    """Two ingress replicas on one spool root behind a round-robin balancer; the broker is cut,
    so both spool; one is SIGKILLed; the broker comes back. The survivor adopts the dead one's
    folder and delivers everything: each notification once in the queue (looked at before any
    worker runs), then the pipeline completes every voucher."""
    scenario = "7. 2 ingresses, 1 SIGKILLed while spooling"
    jackpot = sandboxes.jackpot
    async with (
        TcpProxy(BROKER_HOST, BROKER_PORT) as proxy,
        kit.bridge(
            sandboxes, amqp_url=proxy.amqp_url(), spool_adopt_interval_s=ADOPT_INTERVAL_S
        ) as bridge,
    ):
        victim_port = free_port()
        await bridge.start_ingress()
        victim = await bridge.start_ingress(http_port=victim_port)
        survivor_url = bridge.ingress_url
        victim_url = f"http://127.0.0.1:{victim_port}"
        balancer = Balancer([survivor_url, victim_url])
        async with balancer as balanced:
            pipeline = Pipeline(bridge.settings, sandboxes, balanced, None)
            await proxy.cut()
            for url in (survivor_url, victim_url):
                await wait_until_async(
                    functools.partial(_status_at, bridge, url, "degraded"), 20, f"{url} to spool"
                )
            vouchers = [pipeline.new_voucher() for _ in range(30)]
            senders = Senders()
            load = asyncio.create_task(senders.paced(deliveries(jackpot, vouchers), every_s=0.05))
            try:
                # Every RESERVED answered before the kill: none is half-sent to the victim, so
                # each must reach the queue exactly once.
                await wait_until(
                    lambda: accepted(sandboxes, vouchers) == len(vouchers), 60, "all spooled"
                )
                spooled = bridge.spool_folders()
                code = await victim.kill()
                await proxy.restore()
                cleared = time.monotonic()
                await wait_until(
                    lambda: bridge.spool_depth() == 0 and len(bridge.spool_folders()) == 1,
                    30,
                    "the survivor to drain both folders and remove the dead one's",
                )
                in_queue = await peek_ids(bridge.names.queue(Stage.RESERVATIONS))
                await bridge.start_worker(amqp_url=AMQP_URL)
                await asyncio.wait_for(load, SEND_TIMEOUT_S)
                outcomes = await senders.wait(SEND_TIMEOUT_S)
                ledger, finish = await conclude(
                    bridge,
                    scenario,
                    vouchers,
                    cleared,
                    notes=[
                        "spooled per replica when one was killed: "
                        + ", ".join(f"{n}" for n in spooled.values()),
                        f"{len(in_queue)} RESERVED in the queue after the survivor's drain "
                        f"({len(set(in_queue))} distinct)",
                        f"the balancer found the dead replica refusing "
                        f"{balancer.skipped[victim_url]} times and sent those to the survivor",
                    ],
                )
            finally:
                load.cancel()
                await senders.cancel()
    check(ledger)
    check_finish(finish)
    delivered_fully(outcomes)
    assert code == -signal.SIGKILL
    assert len(spooled) == 2, f"expected two spool folders, found {spooled}"
    assert all(n > 0 for n in spooled.values()), f"a replica spooled nothing: {spooled}"
    assert sorted(in_queue) == sorted(f"{v.voucher_id}:RESERVED" for v in vouchers), in_queue
    assert ledger.activated == len(vouchers)


async def _status_at(bridge: Bridge, url: str, status: str) -> bool:
    answer = await bridge.get_json(f"{url}/readyz")
    return answer is not None and answer[1].get("status") == status


async def peek_ids(queue: str) -> list[str]:
    """The message ids waiting in `queue`, left in it (taken unacked, returned on close)."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        declared = await channel.get_queue(queue, ensure=False)
        found = []
        while (message := await declared.get(no_ack=False, fail=False)) is not None:
            found.append(str(message.message_id))
        await channel.close()  # every unacked message goes back, in order
    finally:
        await connection.close()
    return found
