"""The runner every worker shares: consume, retry, delay, dead-letter, reconnect, drain, shut down.

A worker is `async def handle(message: Incoming) -> Outcome`. The runner acks a message only
after the handler's effect is done and every message the outcome emits is confirmed by the
broker; the acks of one loop turn go out together (`Acks`). Transient errors get a few quick
in-process retries (tenacity), then the message is republished to a delay tier (TTL queue) with
its attempt count and acked: nothing holds a message while waiting out a delay. Permanent
errors, unexpected exceptions and messages past their last tier go to `<ns>.dead` with the
reason, stage, attempts and failure times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from shared import envelope, journal, metrics, topology
from shared.broker import Nodes, Outgoing, connection_name
from shared.errors import BrokerCertificateError, PermanentError, TransientError
from shared.journal import Journal, State, Step
from shared.settings import Settings
from shared.topology import Names, Stage

log = structlog.get_logger("runner")

# Quick retries stay within a few seconds so a message is never held for long.
QUICK_RETRY_BUDGET_S = 5.0
QUICK_WAIT_MAX_S = 2.0
# The wait before the first quick retry: 0.1 to 0.2 s, jittered so retries do not align.
QUICK_FIRST_WAIT_S = 0.1
# A Retry-After longer than this is waited out in a delay tier, not in process.
QUICK_RETRY_AFTER_MAX_S = 3.0
RECONNECT_MAX_DELAY_S = 5.0
# Drain mode calls the queues empty after this many consecutive empty looks, this far apart.
DRAIN_CHECKS = 3
DRAIN_CHECK_INTERVAL_S = 0.1
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


@dataclass(frozen=True)
class Incoming:
    """A decoded delivery as a handler sees it."""

    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    correlation_id: str | None
    stage: Stage
    attempt: int  # delay tiers already waited out
    redelivered: bool = False  # the broker gave it out before (a worker died or let it go)
    # When the stage took the message: its step's time, so steps keep their causal order
    # (a stage starts after the step that fed it, even when it finishes after the next).
    started_ms: int = 0
    # Journey steps the handler learnt on the way (the notification received, a link
    # renewed); recorded with the stage's own step, whatever the outcome.
    steps: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """What a handler did: `done` or `rejected` (a business refusal), and what to publish.

    `step`, `state` and `facts` describe the stage's journey step (its outcome word, the
    voucher's new state, what it learnt about the voucher); by default the step is `result`.
    """

    result: str = "done"
    emit: Sequence[Outgoing] = ()
    detail: str | None = None
    step: str | None = None
    state: State | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)
    # The voucher the step is about, when the message is not a voucher's (a till's sale).
    voucher_id: UUID | None = None


Handler = Callable[[Incoming], Awaitable[Outcome]]


@dataclass(frozen=True)
class Result:
    """What happened to one delivery, before it is settled with the broker."""

    kind: str  # done, rejected, retried or dead
    detail: str | None = None
    emit: Sequence[Outgoing] = ()
    retry_after_s: float | None = None
    outcome: Outcome | None = None


def _tag_of(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None, "a consumed delivery always has its tag"
    return tag


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_QUICK_WAIT = wait_exponential_jitter(multiplier=0.1, max=QUICK_WAIT_MAX_S, jitter=0.1)


def _wait(state: RetryCallState) -> float:
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, TransientError) and error.retry_after_s is not None:
        return error.retry_after_s
    return float(_QUICK_WAIT(state))


def _too_long(error: BaseException | None) -> bool:
    """Whether a partner asks for a longer wait than a message may be held for."""
    return (
        isinstance(error, TransientError)
        and error.retry_after_s is not None
        and error.retry_after_s > QUICK_RETRY_AFTER_MAX_S
    )


class _long_retry_after(stop_base):
    """Stop quick retries when the partner asks for a longer wait than we hold a message for."""

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        return _too_long(outcome.exception() if outcome else None)


def choose_tier(tiers_s: Sequence[int], attempt: int, retry_after_s: float | None) -> int | None:
    """The delay tier for a message that has waited out `attempt` tiers; None when none is left."""
    if attempt >= len(tiers_s):
        return None
    for delay_s in tiers_s[attempt:]:
        if retry_after_s is None or delay_s >= retry_after_s:
            return delay_s
    return tiers_s[-1]


class Consumer(Protocol):
    """What the runner starts on each connection: a stage runner, or the ledger's writer."""

    @property
    def name(self) -> str: ...

    @property
    def queue(self) -> str: ...

    @property
    def in_flight(self) -> set[asyncio.Task[None]]: ...

    async def attach(self, connection: AbstractConnection, journal: Journal | None) -> None: ...

    async def detach(self) -> None: ...


async def journal_for(
    connection: AbstractConnection, names: Names, linger_s: float = 0.0
) -> Journal:
    """A journal on a channel of its own, with confirms: steps are recorded before acks."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    amqp = await channel.get_underlay_channel()

    async def send(body: bytes) -> None:
        # Confirmed, and mandatory: an unroutable journal message raises, acking nothing.
        # Properties of its own: aiormq gives each message without an id a fresh one.
        properties = spec.Basic.Properties(
            content_type=journal.JOURNAL_CONTENT_TYPE, delivery_mode=PERSISTENT
        )
        await amqp.basic_publish(
            body, exchange=names.journal, routing_key="", properties=properties, mandatory=True
        )

    return Journal(send, linger_s)


class Acks:
    """The acks of one channel, sent once per event-loop turn.

    A journal batch confirmed resumes many deliveries in one turn; rather than a frame (and a
    socket write) for each, the longest run of the channel's oldest unsettled deliveries that
    are all ready goes as one `multiple` ack, and the other ready ones one by one.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._unsettled: set[int] = set()  # delivered here, neither acked nor handed back
        self._ready: dict[int, asyncio.Future[None]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        # Acks and nacks are written in the order they were decided: a `multiple` ack written
        # before an earlier single ack or nack would cover its tag, then unknown to the broker.
        self._in_order = asyncio.Lock()

    def delivered(self, tag: int) -> None:
        self._unsettled.add(tag)

    async def ack(self, tag: int) -> None:
        """Returns once the ack covering `tag` is written; raises if it could not be."""
        loop = asyncio.get_running_loop()
        if not self._ready:
            loop.call_soon(self._flush)
        future: asyncio.Future[None] = loop.create_future()
        self._ready[tag] = future
        await future

    async def nack(self, tag: int) -> None:
        """Hand the delivery back to the broker for redelivery.

        In turn with the acks: a `multiple` ack computed after this (it may reach past `tag`)
        is written after it."""
        self._unsettled.discard(tag)
        async with self._in_order:
            await self.channel.basic_nack(tag, requeue=True)

    def _flush(self) -> None:
        ready, self._ready = self._ready, {}
        run: list[int] = []
        for tag in sorted(self._unsettled):
            if tag not in ready:
                break
            run.append(tag)
        self._unsettled.difference_update(ready)
        alone = sorted(ready.keys() - run)
        task = asyncio.ensure_future(self._send(run, alone, ready))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, run: list[int], alone: list[int], ready: dict[int, asyncio.Future[None]]
    ) -> None:
        try:
            async with self._in_order:
                if run:
                    await self.channel.basic_ack(run[-1], multiple=len(run) > 1)
                for tag in alone:
                    await self.channel.basic_ack(tag)
        except BaseException as error:
            for future in ready.values():
                if not future.done():
                    future.set_exception(error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        for future in ready.values():
            if not future.done():
                future.set_result(None)


@dataclass
class StageRunner:
    """Consumes one stage's queue with one handler."""

    stage: Stage
    handler: Handler
    settings: Settings
    names: Names
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    channel: AbstractChannel | None = None
    # The same channel as aiormq sees it: deliveries, acks and publishes go through it
    # directly, one task per delivery and no aio-pika message objects on the way.
    amqp: aiormq.abc.AbstractChannel | None = None
    journal: Journal | None = None

    @property
    def name(self) -> str:
        return str(self.stage)

    @property
    def queue(self) -> str:
        return self.names.queue(self.stage)

    async def attach(self, connection: AbstractConnection, journal: Journal | None) -> None:
        """Open a channel with confirms, set the prefetch, and start consuming."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self.channel = channel
        self.amqp = await channel.get_underlay_channel()
        self.journal = journal
        self.semaphore = asyncio.Semaphore(self.settings.concurrency)
        self.consumer_tag = self._tag()
        acks = Acks(self.amqp)

        async def on_message(message: DeliveredMessage) -> None:
            await self._on_message(message, acks)

        await self.amqp.basic_consume(self.queue, on_message, consumer_tag=self.consumer_tag)

    def _tag(self) -> str:
        return consumer_tag(self.name, self)

    async def detach(self) -> None:
        """Stop taking new messages (in-flight ones keep going)."""
        amqp = self.amqp
        if amqp is not None and not amqp.is_closed:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, RuntimeError):
                await amqp.basic_cancel(self.consumer_tag)

    async def _on_message(self, message: DeliveredMessage, acks: Acks) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(task)
        acks.delivered(_tag_of(message))
        try:
            await self.process(message, acks)
        finally:
            self.in_flight.discard(task)

    async def process(self, message: DeliveredMessage, acks: Acks) -> None:
        properties = message.header.properties
        headers = dict(properties.headers or {})
        incoming = Incoming(
            body=message.body,
            headers=headers,
            message_id=properties.message_id,
            correlation_id=properties.correlation_id,
            stage=self.stage,
            attempt=envelope.attempt_of(headers),
            redelivered=bool(message.redelivered),
            started_ms=journal.now_ms(),
        )
        context = {
            "stage": str(self.stage),
            "message_id": incoming.message_id,
            "voucher_id": incoming.correlation_id,
            "doshii_request_id": headers.get(envelope.REQUEST),
            "attempt": incoming.attempt,
        }
        started = time.perf_counter()
        received = envelope.received_at(headers)
        if received is not None:
            age_s = (datetime.now(UTC) - received).total_seconds()
            metrics.OLDEST_MESSAGE_AGE.labels(self.stage).set(age_s)
        try:
            with structlog.contextvars.bound_contextvars(**context):
                result = await self._handle(incoming)
                kind = await self._settle(message, incoming, result)
                await acks.ack(_tag_of(message))
                metrics.STAGE_MESSAGES.labels(self.stage, kind).inc()
                log.log(
                    logging.WARNING if kind in ("dead", "rejected") else logging.INFO,
                    "message",
                    outcome=kind,
                    detail=result.detail,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )
        except Exception as error:
            # The follow-up or the ack did not go through (channel lost, publish nacked or
            # unroutable). Hand the message back so it is redelivered, here or after a
            # reconnect; its effect is idempotent, and the queue's delivery limit sends one
            # that can never settle to the dead queue.
            log.warning("settle_failed", error=f"{type(error).__name__}: {error}", **context)
            with contextlib.suppress(Exception):
                await acks.nack(_tag_of(message))
        finally:
            metrics.STAGE_SECONDS.labels(self.stage).observe(time.perf_counter() - started)

    async def _handle(self, incoming: Incoming) -> Result:
        try:
            # Only the handler's own work is bounded: settling waits on the broker alone.
            async with self.semaphore:
                outcome = await self._attempts(incoming)
        except TransientError as error:
            return Result("retried", str(error), retry_after_s=error.retry_after_s)
        except PermanentError as error:
            return Result("dead", str(error))
        except Exception as error:
            log.exception("handler_crashed")
            return Result("dead", f"unexpected error: {type(error).__name__}: {error}")
        return Result(outcome.result, outcome.detail, emit=outcome.emit, outcome=outcome)

    async def _attempts(self, incoming: Incoming) -> Outcome:
        """The handler, then a few quick retries (tenacity) if it fails transiently."""
        try:
            # Most messages succeed at once: only a transient failure pays for tenacity.
            return await self._call(incoming)
        except TransientError as error:
            if self.settings.quick_retries <= 1 or _too_long(error):
                raise
            first_wait_s = error.retry_after_s
        if first_wait_s is None:
            first_wait_s = QUICK_FIRST_WAIT_S + random.uniform(0, QUICK_FIRST_WAIT_S)
        await asyncio.sleep(first_wait_s)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=(
                stop_after_attempt(self.settings.quick_retries - 1)
                | stop_after_delay(QUICK_RETRY_BUDGET_S)
                | _long_retry_after()
            ),
            wait=_wait,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._call(incoming)
        raise RuntimeError("quick retries ended without an outcome")

    async def _call(self, incoming: Incoming) -> Outcome:
        incoming.steps.clear()  # a retried call learns its steps again
        return await self.handler(incoming)

    async def _settle(self, message: DeliveredMessage, incoming: Incoming, result: Result) -> str:
        """Publish what the result calls for, confirmed, and journal it: then the delivery may
        be acked. Returns the final outcome."""
        kind = result.kind
        detail = result.detail or ""
        if kind == "retried":
            tiers = self.settings.retry_tiers_s
            delay_s = choose_tier(tiers, incoming.attempt, result.retry_after_s)
            if delay_s is None:
                kind = "dead"
                detail = f"gave up after {incoming.attempt + 1} attempts: {result.detail}"
                await self._dead_letter(message, incoming, detail)
            else:
                await self._delay(message, incoming, delay_s, detail)
                detail = f"{detail} (next try in {delay_s} s)"
        elif kind == "dead":
            await self._dead_letter(message, incoming, detail)
        else:
            for outgoing in result.emit:
                await self.publish(outgoing)
        if self.journal is not None:
            await self.journal.record(self._steps(incoming, kind, detail, result.outcome))
        return kind

    def _steps(
        self, incoming: Incoming, kind: str, detail: str, outcome: Outcome | None
    ) -> list[Step]:
        """The steps to record for this delivery: the handler's, then the stage's own."""
        voucher_id = outcome.voucher_id if outcome is not None else None
        if voucher_id is None:
            with contextlib.suppress(ValueError):
                voucher_id = UUID(incoming.correlation_id or "")
        request = incoming.headers.get(envelope.REQUEST)
        request_id = str(request) if request is not None else None
        if voucher_id is None and request_id is None:
            # Neither a voucher's nor a sale's (it is in the dead queue if it failed).
            return list(incoming.steps)
        message_id = incoming.message_id or f"{voucher_id or request_id}:{self.stage}"
        own: dict[str, Any]
        if kind == "retried":
            own = {"outcome": journal.Outcome.RETRIED}
        elif kind == "dead":
            own = {"outcome": journal.Outcome.DEAD_LETTERED, "state": State.DEAD}
        elif outcome is not None:
            own = {
                "outcome": outcome.step or kind,
                "state": outcome.state,
                "facts": outcome.facts,
            }
        else:
            own = {"outcome": kind}
        stage_step = journal.step(
            voucher_id,
            message_id,
            str(self.stage),
            request_id=request_id,
            attempt=incoming.attempt,
            at_ms=incoming.started_ms or None,
            detail=detail or None,
            **own,
        )
        return [*incoming.steps, stage_step]

    def _failure_headers(self, incoming: Incoming, reason: str) -> dict[str, Any]:
        now = _now_iso()
        headers = dict(incoming.headers)
        headers.setdefault(envelope.FIRST_FAILURE, now)
        headers[envelope.LAST_FAILURE] = now
        headers[envelope.REASON] = reason[:1000]
        headers[envelope.STAGE] = str(self.stage)
        headers[envelope.QUEUE] = self.queue
        return headers

    async def _delay(
        self, message: DeliveredMessage, incoming: Incoming, delay_s: int, reason: str
    ) -> None:
        headers = self._failure_headers(incoming, reason)
        headers[envelope.ATTEMPT] = incoming.attempt + 1
        headers[topology.TIER_HEADER] = f"{delay_s}s"
        await self._republish(message, self.names.delay, self.queue, headers)
        log.info("delayed", delay_s=delay_s, reason=reason)

    async def _dead_letter(
        self, message: DeliveredMessage, incoming: Incoming, reason: str
    ) -> None:
        headers = self._failure_headers(incoming, reason)
        headers[envelope.ATTEMPT] = incoming.attempt + 1
        await self._republish(message, self.names.dead, self.queue, headers)
        log.warning("dead_lettered", reason=reason)

    async def _republish(
        self,
        message: DeliveredMessage,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
    ) -> None:
        properties = message.header.properties
        await self.publish(
            Outgoing(
                exchange=exchange,
                routing_key=routing_key,
                body=message.body,
                message_id=properties.message_id or "",
                correlation_id=properties.correlation_id,
                headers=headers,
            ),
            content_type=properties.content_type,
        )

    async def publish(self, outgoing: Outgoing, content_type: str | None = None) -> None:
        """Publish persistent and mandatory; returns only once the broker confirmed."""
        assert self.amqp is not None
        # A nack raises DeliveryError and a return (unroutable) PublishError: both settle
        # nothing, so the delivery is handed back.
        await self.amqp.basic_publish(
            outgoing.body,
            exchange=outgoing.exchange,
            routing_key=outgoing.routing_key,
            properties=spec.Basic.Properties(
                headers=dict(outgoing.headers),
                message_id=outgoing.message_id,
                correlation_id=outgoing.correlation_id,
                content_type=content_type or "application/json",
                delivery_mode=PERSISTENT,
                timestamp=outgoing.timestamp,
            ),
            mandatory=True,
        )


def consumer_tag(name: str, owner: object) -> str:
    """A consumer tag that names the process and role, unique per consumer."""
    return f"{connection_name(name)} {id(owner):x}"


async def until_quiet(
    channel: AbstractChannel, queues: Sequence[str], busy: Callable[[], bool]
) -> None:
    """Return once `queues` hold no ready message and nothing is `busy`, several looks running.

    A message between two queues (leaving a delay tier, say) is in neither for a moment; the
    repeated looks keep that moment from passing for empty.
    """
    quiet_looks = 0
    while quiet_looks < DRAIN_CHECKS:
        await asyncio.sleep(DRAIN_CHECK_INTERVAL_S)
        counts = [
            (await channel.declare_queue(q, passive=True)).declaration_result.message_count
            for q in queues
        ]
        quiet_looks = 0 if any(counts) or busy() else quiet_looks + 1


class Runner:
    """Runs stage runners on one connection, reconnecting with consumers back after a loss.

    With several broker nodes, a lost connection is replaced by one to the next node that
    answers (the lost node is tried last), and every consumer is attached to it again.
    """

    def __init__(
        self,
        settings: Settings,
        handlers: Mapping[Stage, Handler],
        *,
        role: str = "worker",
        consumers: Sequence[Consumer] = (),
    ) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.role = role
        self.stages: list[Consumer] = [
            StageRunner(s, h, settings, self.names) for s, h in handlers.items()
        ]
        self.stages += consumers
        self.connected = asyncio.Event()
        self.connection: AbstractConnection | None = None
        self.nodes = Nodes(settings)

    @property
    def ready(self) -> bool:
        return self.connection is not None and not self.connection.is_closed

    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self.stages)

    async def _connect(self) -> AbstractConnection:
        connection = await self.nodes.connect(self.role)
        try:
            async with connection.channel() as channel:
                await topology.declare(
                    channel,
                    self.settings.namespace,
                    tiers_s=self.settings.retry_tiers_s,
                    delivery_limit=self.settings.delivery_limit,
                    initial_group_size=self.settings.quorum_initial_group_size,
                )
            # One journal per connection: its steps travel on a channel of the same connection.
            steps = (
                await journal_for(connection, self.names, self.settings.journal_linger_s)
                if self.settings.ledger
                else None
            )
            for stage in self.stages:
                await stage.attach(connection, steps)
        except BaseException:
            # A node that accepted the connection and then failed us: no half-open leftovers.
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return connection

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Consume until `stop` is set (or, with drain, until the queues are empty).

        Raises BrokerCertificateError if the broker's certificate is refused before the first
        connection: retrying cannot fix that. After a first connection, every failure is retried.
        """
        delay_s = 0.1
        stopping = asyncio.ensure_future(stop.wait())
        ever_connected = False
        try:
            while not stop.is_set():
                try:
                    connection = await self._connect()
                except BrokerCertificateError as error:
                    if not ever_connected:
                        raise
                    log.error("broker_certificate_refused", error=str(error), retry_in_s=delay_s)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(stopping), delay_s)
                    delay_s = min(delay_s * 2, RECONNECT_MAX_DELAY_S)
                    continue
                except Exception as error:
                    # Not only AMQP and socket errors: aiormq can raise StopAsyncIteration when
                    # a peer accepts and resets mid-handshake. Nothing may end this loop.
                    log.warning(
                        "broker_connect_failed",
                        error=f"{type(error).__name__}: {error}",
                        retry_in_s=delay_s,
                    )
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(stopping), delay_s)
                    delay_s = min(delay_s * 2, RECONNECT_MAX_DELAY_S)
                    continue
                delay_s = 0.1
                ever_connected = True
                self.connection = connection
                self.connected.set()
                log.info(
                    "consuming",
                    stages=[s.name for s in self.stages],
                    broker=self.nodes.current,
                )
                closed = asyncio.ensure_future(self._closed(connection))
                waiters: list[asyncio.Future[Any]] = [stopping, closed]
                if drain:
                    waiters.append(asyncio.ensure_future(self._until_drained(connection)))
                done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in pending:
                    if waiter is not stopping:
                        waiter.cancel()
                self.connected.clear()
                if closed in done:
                    log.warning("broker_connection_lost", retry_in_s=delay_s)
                    await self._abandon_in_flight()
                    continue
                await self._shutdown(connection)
                return
        finally:
            stopping.cancel()

    async def _closed(self, connection: AbstractConnection) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def closed(*_: Any) -> None:
            if not future.done():
                future.set_result(None)

        connection.close_callbacks.add(closed)
        if connection.is_closed:
            closed()
        await future

    async def _until_drained(self, connection: AbstractConnection) -> None:
        queues = [s.queue for s in self.stages]
        queues += [self.names.tier_queue(t) for t in self.settings.retry_tiers_s]
        async with connection.channel() as channel:
            await until_quiet(channel, queues, lambda: self.in_flight > 0)

    async def _abandon_in_flight(self) -> None:
        # Their acks cannot reach the broker any more; the broker redelivers them.
        for stage in self.stages:
            for task in list(stage.in_flight):
                task.cancel()
        await asyncio.gather(*(t for s in self.stages for t in s.in_flight), return_exceptions=True)

    async def _shutdown(self, connection: AbstractConnection) -> None:
        """Stop consuming, let in-flight messages finish (bounded), then close."""
        for stage in self.stages:
            await stage.detach()
        tasks = [t for s in self.stages for t in s.in_flight]
        if tasks:
            log.info("draining_in_flight", count=len(tasks))
            _, late = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
            for task in late:
                task.cancel()
        await connection.close()
        log.info("stopped")
