"""Dead letters: list them with their reasons, replay them to the queue they failed from, purge."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared import envelope, journal
from shared.broker import connect
from shared.settings import Settings
from shared.topology import Names

# Headers that describe a failure; a replayed message starts again without them.
FAILURE_HEADERS = (
    envelope.ATTEMPT,
    envelope.FIRST_FAILURE,
    envelope.LAST_FAILURE,
    envelope.REASON,
    envelope.STAGE,
    envelope.QUEUE,
    "bridge-tier",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    reason: str
    stage: str
    queue: str
    attempts: int
    first_failure: str
    last_failure: str
    voucher_id: str
    coupon_id: str


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    """Read a dead letter's story from its headers (ours, or the broker's x-death)."""
    headers: Mapping[str, Any] = message.headers or {}
    queue = headers.get(envelope.QUEUE) or headers.get("x-first-death-queue") or ""
    reason = headers.get(envelope.REASON)
    if reason is None:
        # Dead-lettered by the broker: the queue's x-delivery-limit was reached.
        reason = f"broker dead-lettered: {_text(headers.get('x-first-death-reason', 'unknown'))}"
    try:
        body = json.loads(message.body)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return DeadLetter(
        message_id=message.message_id or "",
        reason=_text(reason),
        stage=_text(headers.get(envelope.STAGE, _text(queue).rsplit(".", 1)[-1])),
        queue=_text(queue),
        attempts=envelope.attempt_of(headers),
        first_failure=_text(headers.get(envelope.FIRST_FAILURE, "")),
        last_failure=_text(headers.get(envelope.LAST_FAILURE, "")),
        voucher_id=str(body.get("id") or body.get("voucher_id") or message.correlation_id or ""),
        coupon_id=str(body.get("couponId") or body.get("coupon_id") or ""),
    )


async def _take_all(channel: AbstractChannel, names: Names) -> list[AbstractIncomingMessage]:
    """Every dead letter, unacked: closing the channel without acking puts them back."""
    queue = await channel.get_queue(names.dead, ensure=False)
    taken: list[AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        taken.append(message)
    return taken


async def list_dead(settings: Settings) -> list[DeadLetter]:
    connection = await connect(settings, "dlq")
    async with connection:
        channel = await connection.channel()
        letters = [describe(m) for m in await _take_all(channel, Names(settings.namespace))]
        await channel.close()
    return letters


async def replay(settings: Settings, message_id: str | None) -> int:
    """Send dead letters (all, or those with this id) back to their queue, attempts reset."""
    names = Names(settings.namespace)
    connection = await connect(settings, "dlq")
    replayed = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        retry = await channel.get_exchange(names.retry, ensure=False)
        steps = await channel.get_exchange(names.journal, ensure=False)
        for message in await _take_all(channel, names):
            letter = describe(message)
            if message_id is not None and letter.message_id != message_id:
                continue
            if names.stage_of(letter.queue) is None:
                continue  # not from a work queue of this namespace: leave it for a person
            headers = {k: v for k, v in (message.headers or {}).items() if k not in FAILURE_HEADERS}
            await retry.publish(
                aio_pika.Message(
                    message.body,
                    headers=headers,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=letter.queue,
                mandatory=True,
            )
            if settings.ledger and letter.voucher_id:
                await steps.publish(
                    aio_pika.Message(
                        journal.encode([replayed_step(letter)]),
                        content_type=journal.JOURNAL_CONTENT_TYPE,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key="",
                    mandatory=True,
                )
            await message.ack()
            replayed += 1
        await channel.close()
    return replayed


def replayed_step(letter: DeadLetter) -> journal.Step:
    """The journey step of a replay; each replay is a step of its own (keyed by its time)."""
    at_ms = journal.now_ms()
    return journal.step(
        letter.voucher_id,
        f"{letter.message_id}:replay:{at_ms}",
        "dlq",
        journal.Outcome.REPLAYED,
        at_ms=at_ms,
        detail=f"back to {letter.queue} after: {letter.reason}",
        state=journal.State.REPLAYED,
    )


async def purge(settings: Settings) -> int:
    connection = await connect(settings, "dlq")
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(Names(settings.namespace).dead, ensure=False)
        result = await queue.purge()
        return int(result.message_count or 0)


def table(letters: list[DeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    columns = ("message_id", "stage", "attempts", "coupon_id", "last_failure", "reason")
    rows = [[str(getattr(letter, c)) for c in columns] for letter in letters]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns[:-1])]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns[:-1], widths, strict=True)) + "  reason"]
    for row in rows:
        cells = zip(row[:-1], widths, strict=True)
        lines.append("  ".join(c.ljust(w) for c, w in cells) + "  " + row[-1])
    return "\n".join(lines)


async def command(
    settings: Settings, args: argparse.Namespace, stop: asyncio.Event | None = None
) -> int:
    """`bridge dlq list|replay|purge`."""
    if args.dlq_command == "list":
        print(table(await list_dead(settings)))
    elif args.dlq_command == "replay":
        count = await replay(settings, None if args.all else args.id)
        print(f"replayed {count} dead letter(s)")
        if count == 0 and not args.all:
            print(f"no dead letter has the id {args.id}")
            return 1
    elif args.dlq_command == "purge":
        if not args.yes:
            print("this deletes every dead letter for good; add --yes to do it")
            return 1
        print(f"purged {await purge(settings)} dead letter(s)")
    return 0
