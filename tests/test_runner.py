"""The shared runner on the real broker: acks, retries, delay tiers, dead letters, reconnects."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.common import FieldTable

from shared import envelope
from shared.broker import Outgoing
from shared.errors import PermanentError, TransientError
from shared.models import Route
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.conftest import AMQP_URL
from tests.support.tcpproxy import TcpProxy
from workers import dlq
from workers.runner import (
    QUICK_RETRY_AFTER_MAX_S,
    Acks,
    Incoming,
    Outcome,
    Runner,
    choose_tier,
)


async def publish(
    channel: AbstractChannel, names: Names, route: Route, body: bytes, mid: str
) -> None:
    exchange = await channel.get_exchange(names.events, ensure=False)
    headers: FieldTable = {
        envelope.LOCATION: "loc",
        envelope.REQUEST: "req",
        envelope.AMOUNT_CENTS: 100,
    }
    await exchange.publish(
        aio_pika.Message(body, message_id=mid, headers=headers, delivery_mode=2), routing_key=route
    )


async def depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def drain(runner: Runner, timeout_s: float = 30.0) -> None:
    await asyncio.wait_for(runner.run(asyncio.Event(), drain=True), timeout_s)


def test_choose_tier() -> None:
    tiers = [10, 60, 300]
    assert choose_tier(tiers, 0, None) == 10
    assert choose_tier(tiers, 1, None) == 60
    assert choose_tier(tiers, 3, None) is None
    assert choose_tier(tiers, 0, 45) == 60  # a partner's Retry-After picks a long enough tier
    assert choose_tier(tiers, 0, 9999) == 300


async def test_done_messages_are_acked_and_emitted_messages_confirmed(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    seen: list[bytes] = []

    async def handle(message: Incoming) -> Outcome:
        seen.append(message.body)
        emitted = Outgoing(broker.events, Route.DOSHII, b"follow-up:" + message.body, "f")
        return Outcome(emit=[emitted])

    for i in range(20):
        await publish(channel, broker, Route.RESERVED, f"m{i}".encode(), f"id{i}")
    await drain(Runner(settings, {Stage.RESERVATIONS: handle}))
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(20))
    assert await depth(channel, broker.queue(Stage.RESERVATIONS)) == 0
    assert await depth(channel, broker.queue(Stage.DOSHII)) == 20


async def test_transient_errors_retry_quickly_then_through_delay_tiers_then_dead(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    settings = make_settings(quick_retries=2)
    calls: Counter[int] = Counter()

    async def handle(message: Incoming) -> Outcome:
        calls[message.attempt] += 1
        raise TransientError("partner down")

    await publish(channel, broker, Route.RESERVED, b"{}", "v1:RESERVED")
    await drain(Runner(settings, {Stage.RESERVATIONS: handle}))
    # Two quick tries per delivery: the first, then one after each of the two tiers (1 s, 2 s).
    assert calls == {0: 2, 1: 2, 2: 2}
    letters = await dlq.list_dead(settings)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.message_id == "v1:RESERVED"
    assert letter.reason == "gave up after 3 attempts: partner down"
    assert letter.stage == "reservations"
    assert letter.attempts == 3
    assert letter.first_failure <= letter.last_failure
    # Listing does not consume.
    assert len(await dlq.list_dead(settings)) == 1


async def test_transient_then_success_is_done_without_dead_letter(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    failures = iter([TransientError("blip"), TransientError("blip")])

    async def handle(message: Incoming) -> Outcome:
        error = next(failures, None)
        if error:
            raise error
        return Outcome()

    await publish(channel, broker, Route.RESERVED, b"{}", "x")
    await drain(Runner(settings, {Stage.RESERVATIONS: handle}))
    assert await depth(channel, broker.dead) == 0
    assert await depth(channel, broker.queue(Stage.RESERVATIONS)) == 0


async def test_long_retry_after_goes_to_a_tier_instead_of_holding_the_message(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    attempts: list[int] = []

    async def handle(message: Incoming) -> Outcome:
        attempts.append(message.attempt)
        if message.attempt == 0:
            raise TransientError("slow down", retry_after_s=QUICK_RETRY_AFTER_MAX_S + 1)
        return Outcome()

    await publish(channel, broker, Route.RESERVED, b"{}", "x")
    await drain(Runner(settings, {Stage.RESERVATIONS: handle}))
    # A Retry-After longer than a quick retry may wait: one call, then straight to a tier.
    assert attempts == [0, 1]


async def test_permanent_and_unexpected_errors_are_dead_lettered_at_once_and_replayable(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    fixed = False

    async def handle(message: Incoming) -> Outcome:
        if fixed:
            return Outcome()
        if message.body == b"bad":
            raise PermanentError("amount does not match")
        raise KeyError("bug")

    await publish(channel, broker, Route.READY, b"bad", "a:READY")
    await publish(channel, broker, Route.READY, b"crash", "b:READY")
    await drain(Runner(settings, {Stage.PDFS: handle}))
    letters = {letter.message_id: letter for letter in await dlq.list_dead(settings)}
    assert letters["a:READY"].reason == "amount does not match"
    assert letters["a:READY"].attempts == 1
    assert letters["b:READY"].reason.startswith("unexpected error: KeyError")

    fixed = True
    assert await dlq.replay(settings, "a:READY") == 1
    assert [letter.message_id for letter in await dlq.list_dead(settings)] == ["b:READY"]
    await drain(Runner(settings, {Stage.PDFS: handle}))
    assert await dlq.replay(settings, None) == 1
    await drain(Runner(settings, {Stage.PDFS: handle}))
    assert await dlq.list_dead(settings) == []
    assert await depth(channel, broker.queue(Stage.PDFS)) == 0


async def test_purge_empties_the_dead_queue(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    async def handle(message: Incoming) -> Outcome:
        raise PermanentError("no")

    await publish(channel, broker, Route.READY, b"x", "x")
    await drain(Runner(settings, {Stage.PDFS: handle}))
    assert await dlq.purge(settings) == 1
    assert await dlq.list_dead(settings) == []


async def test_rejected_is_acked_not_dead_lettered(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    async def handle(message: Incoming) -> Outcome:
        return Outcome("rejected", detail="amount mismatch")

    await publish(channel, broker, Route.RESERVED, b"x", "x")
    await drain(Runner(settings, {Stage.RESERVATIONS: handle}))
    assert await depth(channel, broker.dead) == 0
    assert await depth(channel, broker.queue(Stage.RESERVATIONS)) == 0


async def test_consumers_come_back_after_a_lost_connection(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    target = urlsplit(AMQP_URL)
    handled: list[str | None] = []
    got_one = asyncio.Event()

    async def handle(message: Incoming) -> Outcome:
        handled.append(message.message_id)
        got_one.set()
        return Outcome()

    async with TcpProxy(target.hostname or "127.0.0.1", target.port or 5672) as proxy:
        settings = make_settings(amqp_url=proxy.amqp_url())
        runner = Runner(settings, {Stage.LIFECYCLE: handle})
        stop = asyncio.Event()
        running = asyncio.create_task(runner.run(stop))
        await asyncio.wait_for(runner.connected.wait(), 10)
        await publish(channel, broker, Route.LIFECYCLE, b"1", "before")
        await asyncio.wait_for(got_one.wait(), 10)

        await proxy.cut()
        for i in range(10):
            await publish(channel, broker, Route.LIFECYCLE, b"x", f"during-{i}")
        await proxy.restore()
        await asyncio.wait_for(runner.connected.wait(), 15)
        queue = broker.queue(Stage.LIFECYCLE)

        async def drained() -> None:
            while len(handled) < 11:  # noqa: ASYNC110 - the handler list is the observable
                await asyncio.sleep(0.05)

        await asyncio.wait_for(drained(), 20)
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.consumer_count == 1
        assert await depth(channel, queue) == 0
        stop.set()
        await asyncio.wait_for(running, 10)
    assert sorted(h for h in handled if h and h.startswith("during")) == sorted(
        f"during-{i}" for i in range(10)
    )


async def test_stop_finishes_in_flight_work_before_closing(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    finished: list[str | None] = []

    async def handle(message: Incoming) -> Outcome:
        started.set()
        await release.wait()
        finished.append(message.message_id)
        return Outcome()

    runner = Runner(settings, {Stage.DOSHII: handle})
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))
    await publish(channel, broker, Route.DOSHII, b"{}", "slow")
    await asyncio.wait_for(started.wait(), 10)
    stop.set()
    await asyncio.sleep(0)
    assert not running.done()
    release.set()
    await asyncio.wait_for(running, 10)
    assert finished == ["slow"]
    assert await depth(channel, broker.queue(Stage.DOSHII)) == 0


@pytest.mark.parametrize("limit", [2])
async def test_a_message_that_kills_the_worker_every_time_reaches_the_dead_queue(
    make_settings: Callable[..., Settings], namespace: str, channel: AbstractChannel, limit: int
) -> None:
    # The broker's x-delivery-limit dead-letters it; the runner never sees a clean failure.
    from shared import topology

    settings = make_settings(delivery_limit=limit)
    names = await topology.declare(
        channel, namespace, tiers_s=settings.retry_tiers_s, delivery_limit=limit
    )
    try:
        await publish(channel, names, Route.READY, b"poison", "p:READY")
        queue = await channel.get_queue(names.queue(Stage.PDFS), ensure=False)
        for _ in range(limit + 1):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            await message.nack(requeue=True)  # what a crashed consumer's channel does

        async def dead_arrives() -> None:
            while await depth(channel, names.dead) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(dead_arrives(), 10)
        letters = await dlq.list_dead(settings)
        assert [letter.message_id for letter in letters] == ["p:READY"]
        assert letters[0].queue == names.queue(Stage.PDFS)
        assert "delivery_limit" in letters[0].reason
    finally:
        await topology.delete(channel, namespace, tiers_s=settings.retry_tiers_s)


async def test_any_connect_failure_is_retried_not_fatal(
    settings: Settings, broker: Names, channel: AbstractChannel
) -> None:
    # aiormq has raised StopAsyncIteration when a peer reset mid-handshake; the loop survives.
    failures = [StopAsyncIteration(), RuntimeError("odd"), ConnectionResetError()]

    class Flaky(Runner):
        async def _connect(self) -> AbstractConnection:
            if failures:
                raise failures.pop(0)
            return await super()._connect()

    handled: list[str | None] = []

    async def handle(message: Incoming) -> Outcome:
        handled.append(message.message_id)
        return Outcome()

    await publish(channel, broker, Route.LIFECYCLE, b"x", "after-failures")
    await drain(Flaky(settings, {Stage.LIFECYCLE: handle}))
    assert failures == []
    assert handled == ["after-failures"]


async def test_a_follow_up_the_broker_refuses_is_retried_then_dead_lettered_never_stuck(
    make_settings: Callable[..., Settings], namespace: str, channel: AbstractChannel
) -> None:
    from shared import topology

    limit = 2
    settings = make_settings(delivery_limit=limit)
    names = await topology.declare(
        channel, namespace, tiers_s=settings.retry_tiers_s, delivery_limit=limit
    )
    calls = 0

    async def handle(message: Incoming) -> Outcome:
        nonlocal calls
        calls += 1
        # Routed nowhere: the mandatory publish comes back, so the message cannot be acked.
        return Outcome(emit=[Outgoing(names.events, "nowhere", b"x", "lost")])

    try:
        await publish(channel, names, Route.READY, b"x", "refused:READY")
        await drain(Runner(settings, {Stage.PDFS: handle}))
        letters = await dlq.list_dead(settings)
        assert [letter.message_id for letter in letters] == ["refused:READY"]
        assert "delivery_limit" in letters[0].reason
        assert calls == limit + 1
    finally:
        await topology.delete(channel, namespace, tiers_s=settings.retry_tiers_s)


async def _deliveries(
    names: Names, channel: AbstractChannel, count: int
) -> tuple[AbstractConnection, Acks, list[DeliveredMessage]]:
    """`count` messages published to the reservations queue, then taken unacked on a channel
    of a connection of their own, with that channel's Acks."""
    for i in range(count):
        await publish(channel, names, Route.RESERVED, f"m{i + 1}".encode(), f"id{i + 1}")
    connection = await aio_pika.connect(AMQP_URL)
    amqp = await (await connection.channel()).get_underlay_channel()
    acks = Acks(amqp)
    taken: list[DeliveredMessage] = []
    arrived = asyncio.Event()

    async def take(message: DeliveredMessage) -> None:
        assert message.delivery_tag is not None
        acks.delivered(message.delivery_tag)
        taken.append(message)
        if len(taken) == count:
            arrived.set()

    await amqp.basic_consume(names.queue(Stage.RESERVATIONS), take)
    await asyncio.wait_for(arrived.wait(), 10)
    return connection, acks, taken


async def _left_in_queue(names: Names, channel: AbstractChannel) -> list[bytes]:
    queue = await channel.get_queue(names.queue(Stage.RESERVATIONS), ensure=False)
    bodies = []
    while (message := await queue.get(fail=False)) is not None:
        bodies.append(message.body)
        await message.ack()
    return sorted(bodies)


@pytest.mark.parametrize("fourth", ["pending", "handed back"])
async def test_acks_of_one_turn_cover_only_the_deliveries_that_are_ready(
    fourth: str, broker: Names, channel: AbstractChannel
) -> None:
    connection, acks, taken = await _deliveries(broker, channel, 6)
    tags = [m.delivery_tag for m in taken]
    assert tags == [1, 2, 3, 4, 5, 6]
    if fourth == "handed back":
        await acks.nack(4)
    # 1, 2, 3 and 5 ready in the same turn; 6 (and 4 when pending) never acked.
    await asyncio.gather(acks.ack(2), acks.ack(1), acks.ack(5), acks.ack(3))
    await connection.close()  # what was not acked goes back to the queue
    assert await _left_in_queue(broker, channel) == [b"m4", b"m6"]


async def test_acks_of_successive_turns_reach_the_broker_in_the_order_decided(
    broker: Names, channel: AbstractChannel
) -> None:
    connection, acks, _ = await _deliveries(broker, channel, 6)
    first = [asyncio.ensure_future(acks.ack(1)), asyncio.ensure_future(acks.ack(3))]
    await asyncio.sleep(0)  # 1 and 3 ready: their turn's acks (1, then 3 alone) are decided
    # The next turn's `multiple` ack up to 4 covers 3: written before the ack of 3, it would
    # make 3 an unknown tag and the broker would close the channel.
    second = [asyncio.ensure_future(acks.ack(2)), asyncio.ensure_future(acks.ack(4))]
    await asyncio.gather(*first, *second)
    await acks.nack(5)
    # A round trip: had the broker refused a tag, it would have closed the channel by now.
    await acks.channel.basic_qos(prefetch_count=10)
    await connection.close()
    assert await _left_in_queue(broker, channel) == [b"m5", b"m6"]
