"""The benchmark's own broker chores: count, purge and delete queues, on a plain connection.

A plain (non-robust) aio-pika connection on purpose: a RobustChannel caches passive declares, so
it would report a stale message count.
"""

from __future__ import annotations

from collections.abc import Sequence

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from shared import topology

# Broker operations are quick; a stuck one must not hang the benchmark.
BROKER_OP_TIMEOUT_S = 15.0


class BrokerAdmin:
    """Counting, purging and deleting queues; reopens its channel after a 404 closes it."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self._connection = connection
        self._channel = channel

    @classmethod
    async def open(cls, url: str) -> BrokerAdmin:
        """Connect to `url` and open a channel."""
        connection = await aio_pika.connect(
            url, client_properties={"connection_name": "voucher-bridge bench"}
        )
        return cls(connection, await connection.channel())

    async def _ready_channel(self) -> AbstractChannel:
        if self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def count(self, queue: str) -> int | None:
        """Messages ready in `queue` (passive declare), or None if there is no such queue."""
        channel = await self._ready_channel()
        try:
            declared = await channel.declare_queue(queue, passive=True, timeout=BROKER_OP_TIMEOUT_S)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        count: int | None = declared.declaration_result.message_count
        return count

    async def purge(self, queue: str) -> int:
        """Drop every message in `queue`; how many went. A missing queue counts as empty."""
        channel = await self._ready_channel()
        try:
            declared = await channel.declare_queue(queue, passive=True, timeout=BROKER_OP_TIMEOUT_S)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0
        purged = await declared.purge(timeout=BROKER_OP_TIMEOUT_S)
        return (purged.message_count or 0) if purged is not None else 0

    async def purge_all(self, queues: Sequence[str]) -> int:
        """Purge each of `queues`; how many messages went in all."""
        total = 0
        for queue in queues:
            total += await self.purge(queue)
        return total

    async def peek(self, queue: str) -> list[AbstractIncomingMessage]:
        """Every message in `queue`, left there: taken unacked, then their channel is closed."""
        channel = await self._connection.channel()
        try:
            try:
                declared = await channel.declare_queue(
                    queue, passive=True, timeout=BROKER_OP_TIMEOUT_S
                )
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return []
            taken: list[AbstractIncomingMessage] = []
            while (
                message := await declared.get(no_ack=False, fail=False, timeout=BROKER_OP_TIMEOUT_S)
            ) is not None:
                taken.append(message)
            return taken
        finally:
            if not channel.is_closed:
                await channel.close()  # the unacked messages go back to the queue

    async def delete_namespace(self, namespace: str, *, tiers_s: Sequence[int]) -> None:
        """Delete every exchange and queue of the project's `namespace`."""
        await topology.delete(await self._ready_channel(), namespace, tiers_s=tiers_s)

    async def close(self) -> None:
        """Close the connection (and its channel)."""
        await self._connection.close()


def namespace_queues(namespace: str, *, tiers_s: Sequence[int]) -> list[str]:
    """Every queue `shared.topology.declare` creates for `namespace`."""
    names = topology.Names(namespace)
    return [
        names.dead,
        *(names.queue(stage) for stage in topology.Stage),
        *(names.tier_queue(delay_s) for delay_s in tiers_s),
    ]
