"""The broker's shape, declared in one place: exchanges, queues, delay tiers and the dead queue.

    <ns>.events (topic) ─ voucher.reserved ─▶ <ns>.reservations
                        ─ voucher.ready    ─▶ <ns>.pdfs
                        ─ voucher.lifecycle▶ <ns>.lifecycle
                        ─ doshii.update    ─▶ <ns>.doshii
                        ─ doshii.card_activate ▶ <ns>.intake  (the till's sale, from Doshii)
    <ns>.delay (headers, bridge-tier) ─▶ <ns>.delay.<N>s  (TTL N s, dead-letters to <ns>.retry)
    <ns>.retry (direct, key = work queue name) ─▶ that work queue
    <ns>.dead (fanout) ─▶ <ns>.dead   (explicit dead letters and x-delivery-limit overflow)
    <ns>.journal (fanout) ─▶ <ns>.ledger  (journey steps; the ledger worker writes them down)

Every queue is a quorum queue with at-least-once dead-lettering, so a message moving to a delay
tier, back from one, or to the dead queue is never dropped on the way. On a cluster each quorum
queue is replicated to `initial_group_size` nodes (by default the broker's: every node, up to 5),
so it keeps working while a minority of the nodes is away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import aio_pika
from aio_pika.abc import AbstractChannel
from pamqp.common import FieldTable

from shared.models import Route

# Headers exchanges ignore binding arguments that start with "x-": this one must not.
TIER_HEADER = "bridge-tier"


class Stage(StrEnum):
    """The worker roles, each consuming one work queue."""

    RESERVATIONS = "reservations"
    PDFS = "pdfs"
    LIFECYCLE = "lifecycle"
    DOSHII = "doshii"
    INTAKE = "intake"


STAGE_ROUTES: dict[Stage, Route] = {
    Stage.INTAKE: Route.CARD_ACTIVATE,
    Stage.RESERVATIONS: Route.RESERVED,
    Stage.PDFS: Route.READY,
    Stage.LIFECYCLE: Route.LIFECYCLE,
    Stage.DOSHII: Route.DOSHII,
}


@dataclass(frozen=True)
class Names:
    """Every exchange and queue name of one namespace."""

    namespace: str

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    @property
    def delay(self) -> str:
        return f"{self.namespace}.delay"

    @property
    def retry(self) -> str:
        return f"{self.namespace}.retry"

    @property
    def dead(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def journal(self) -> str:
        return f"{self.namespace}.journal"

    @property
    def ledger(self) -> str:
        return f"{self.namespace}.ledger"

    def queue(self, stage: Stage) -> str:
        return f"{self.namespace}.{stage}"

    def tier_queue(self, delay_s: int) -> str:
        return f"{self.namespace}.delay.{delay_s}s"

    def stage_of(self, queue: str) -> Stage | None:
        for stage in Stage:
            if self.queue(stage) == queue:
                return stage
        return None


def _replicas(initial_group_size: int | None) -> FieldTable:
    if initial_group_size is None:
        return {"x-queue-type": "quorum"}
    return {"x-queue-type": "quorum", "x-quorum-initial-group-size": initial_group_size}


def _quorum(extra: FieldTable, initial_group_size: int | None) -> FieldTable:
    return {
        **_replicas(initial_group_size),
        "x-dead-letter-strategy": "at-least-once",
        # at-least-once dead-lettering requires reject-publish overflow.
        "x-overflow": "reject-publish",
        **extra,
    }


async def declare(
    channel: AbstractChannel,
    namespace: str,
    *,
    tiers_s: Sequence[int],
    delivery_limit: int,
    initial_group_size: int | None = None,
) -> Names:
    """Declare every exchange, queue and binding of `namespace`. Declaring twice is harmless.

    `initial_group_size` is how many cluster nodes hold each quorum queue (None: the broker's
    default). RabbitMQ refuses (PRECONDITION_FAILED) a declare whose size differs from the one
    an existing queue was created with: it must stay what it was for a namespace.
    """
    names = Names(namespace)
    kinds = aio_pika.ExchangeType
    events = await channel.declare_exchange(names.events, kinds.TOPIC, durable=True)
    delay = await channel.declare_exchange(names.delay, kinds.HEADERS, durable=True)
    retry = await channel.declare_exchange(names.retry, kinds.DIRECT, durable=True)
    dead = await channel.declare_exchange(names.dead, kinds.FANOUT, durable=True)
    journal = await channel.declare_exchange(names.journal, kinds.FANOUT, durable=True)

    dead_queue = await channel.declare_queue(
        names.dead, durable=True, arguments=_replicas(initial_group_size)
    )
    await dead_queue.bind(dead)

    for stage, route in STAGE_ROUTES.items():
        queue = await channel.declare_queue(
            names.queue(stage),
            durable=True,
            arguments=_quorum(
                {"x-delivery-limit": delivery_limit, "x-dead-letter-exchange": names.dead},
                initial_group_size,
            ),
        )
        await queue.bind(events, routing_key=route)
        await queue.bind(retry, routing_key=names.queue(stage))

    # Steps wait here while PostgreSQL is away; a journal message that cannot be written
    # after the delivery limit goes to the dead queue like any other.
    ledger = await channel.declare_queue(
        names.ledger,
        durable=True,
        arguments=_quorum(
            {"x-delivery-limit": delivery_limit, "x-dead-letter-exchange": names.dead},
            initial_group_size,
        ),
    )
    await ledger.bind(journal)

    for delay_s in tiers_s:
        tier = await channel.declare_queue(
            names.tier_queue(delay_s),
            durable=True,
            arguments=_quorum(
                {"x-message-ttl": delay_s * 1000, "x-dead-letter-exchange": names.retry},
                initial_group_size,
            ),
        )
        await tier.bind(delay, arguments={"x-match": "all", TIER_HEADER: f"{delay_s}s"})
    return names


async def delete(channel: AbstractChannel, namespace: str, *, tiers_s: Sequence[int]) -> None:
    """Remove every exchange and queue of `namespace` (tests and the demo clean up with it)."""
    names = Names(namespace)
    queues = [names.dead, names.ledger, *(names.queue(s) for s in Stage)]
    queues += [names.tier_queue(t) for t in tiers_s]
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in (names.events, names.delay, names.retry, names.dead, names.journal):
        await channel.exchange_delete(exchange)
