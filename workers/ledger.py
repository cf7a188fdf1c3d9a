"""ledger (`<ns>.ledger`): write the journey steps every stage recorded to PostgreSQL, in batches.

Journal messages are taken as they come and written together: everything that arrived while
the last write ran goes in the next one, one transaction, then one ack for all of them. While
PostgreSQL is away nothing is acked and the writes are tried again; the steps wait in the
queue, and the activation path, which never waits for the ledger, goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from shared import journal, metrics
from shared.errors import PermanentError
from shared.journal import Journal, Step
from shared.ledger import Ledger
from shared.settings import Settings
from shared.topology import Names
from workers.runner import consumer_tag

log = structlog.get_logger("ledger")

# Journal messages held unacked at once: each may hold hundreds of steps.
PREFETCH = 256
# How long the first journal message of a batch waits for others: one transaction for many
# steps costs PostgreSQL far less than many small ones, and nothing waits on the ledger.
WRITE_LINGER_S = 0.1
# How long a failed write waits before the next try, doubling up to the most.
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0


class LedgerWriter:
    """Consumes `<ns>.ledger` and writes its steps to the ledger (a runner Consumer)."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.ledger = ledger
        self.in_flight: set[asyncio.Task[None]] = set()
        self._arrived: list[AbstractIncomingMessage] = []
        self._writing: asyncio.Task[None] | None = None
        self._channel: AbstractChannel | None = None

    @property
    def name(self) -> str:
        return "ledger"

    @property
    def queue(self) -> str:
        return self.names.ledger

    async def attach(self, connection: AbstractConnection, journal: Journal | None) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(self.queue, ensure=False)
        self._channel = channel
        self._arrived = []
        self.consumer_tag = await queue.consume(
            self._on_message, consumer_tag=consumer_tag(self.name, self)
        )

    async def detach(self) -> None:
        """Stop taking journal messages; what arrived is still written and acked."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, RuntimeError):
                queue = await channel.get_queue(self.queue, ensure=False)
                await queue.cancel(self.consumer_tag)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._arrived.append(message)
        if self._writing is None or self._writing.done():
            # In flight from the first arrival on, so a drain never sees an unwritten step.
            self._writing = task = asyncio.create_task(self._write_arrived())
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def _write_arrived(self) -> None:
        """Write what arrived, batch after batch, until nothing is left."""
        await asyncio.sleep(WRITE_LINGER_S)  # let the next deliveries join the first batch
        while self._arrived:
            batch, self._arrived = self._arrived, []
            try:
                await self._write(batch)
            except Exception as error:
                # The channel went away before the ack: the broker redelivers the batch,
                # and writing its steps again adds nothing.
                log.warning("ledger_ack_failed", error=f"{type(error).__name__}: {error}")
                self._arrived = []
                return

    async def _write(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """Decode, write in one transaction (retrying while PostgreSQL is away), then ack."""
        steps: list[Step] = []
        for message in batch:
            try:
                steps.extend(journal.decode(message.body))
            except PermanentError as error:
                log.warning("journal_message_refused", reason=str(error))
                # Rejected without requeue: the queue dead-letters it, reason in x-death.
                await message.reject(requeue=False)
        accepted = [m for m in batch if not m.processed]
        if not accepted:
            return
        started = time.perf_counter()
        delay_s = RETRY_FIRST_S
        while True:
            try:
                await self.ledger.record(steps)
                break
            except Exception as error:
                metrics.LEDGER_WRITES.labels("failed").inc()
                log.warning(
                    "ledger_write_failed",
                    error=f"{type(error).__name__}: {error}",
                    steps=len(steps),
                    retry_in_s=delay_s,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)
        metrics.LEDGER_WRITES.labels("written").inc()
        metrics.LEDGER_STEPS.inc(len(steps))
        metrics.LEDGER_WRITE_SECONDS.observe(time.perf_counter() - started)
        # Deliveries on one channel are acked in order: one ack covers the whole batch.
        last = max(accepted, key=lambda m: m.delivery_tag or 0)
        await last.ack(multiple=True)
