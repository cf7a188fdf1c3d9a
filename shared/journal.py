"""Journey steps: what each stage did to a voucher, on their way to the ledger.

Every stage records its steps on `<ns>.journal` before it acks the message that caused them,
so a step is never lost, and the `ledger` worker writes them to PostgreSQL in batches. The
activation path never waits for PostgreSQL: while it is away the steps wait in `<ns>.ledger`.

Steps are grouped: while one journal message is on its way to the broker, the steps recorded
meanwhile gather, and go together in the next one (a group commit). A quiet stage sends each
step at once; a busy one sends one message for many steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import PermanentError

JOURNAL_CONTENT_TYPE = "application/vnd.voucher-bridge.steps+json"
# A journal message holds at most this many steps, so one stays small for the broker.
MAX_STEPS_PER_MESSAGE = 500
DETAIL_MAX_CHARS = 500


class State(StrEnum):
    """Where the ledger says a voucher is."""

    REPLAYED = "replayed"
    RESERVED = "reserved"
    CONFIRMED = "confirmed"
    READY = "ready"
    PDF_STORED = "pdf_stored"
    ACTIVATED = "activated"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    EXPIRED = "expired"
    DEAD = "dead"
    REFUND_NEEDED = "refund_needed"


# Steps are ordered by time; two in the same millisecond by how far along each state is.
RANKS: dict[State, int] = {
    State.REPLAYED: 0,
    State.RESERVED: 1,
    State.CONFIRMED: 2,
    State.READY: 3,
    State.PDF_STORED: 4,
    State.ACTIVATED: 5,
    State.CANCELLED: 5,
    State.REJECTED: 5,
    State.EXPIRED: 5,
    State.DEAD: 6,
    State.REFUND_NEEDED: 7,
}
# Where nothing more happens by itself.
FINISHED = frozenset({State.ACTIVATED, State.CANCELLED, State.REJECTED, State.EXPIRED})
# The states a notification brings. One can come after the voucher moved on: Jackpot repeats a
# notification until it gets a 200, and it notifies RESERVED while the intake hands the same
# reservation on from Jackpot's answer. A step to one of these never moves a voucher back.
NOTIFIED = frozenset({State.RESERVED, State.READY})


def moves_on(current: State | None, new: State) -> bool:
    """Whether a later step to `new` replaces `current` (queries.sql's upsert_vouchers agrees)."""
    return current is None or new not in NOTIFIED or RANKS[new] >= RANKS[current]


class Outcome(StrEnum):
    """What a step was: the words of `bridge status`."""

    RECEIVED = "received"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    LINK_RENEWED = "link renewed"
    PDF_STORED = "PDF stored"
    ACTIVATED = "activated"
    CANCELLED = "cancelled"
    CANCELLING = "cancelling"
    IGNORED = "ignored"
    RETRIED = "retried"
    DEAD_LETTERED = "dead-lettered"
    REPLAYED = "replayed"
    NOT_READY = "not ready yet"
    READY_FOUND = "link found"
    EXPIRED = "expired"
    REFUND_NEEDED = "refund needed"
    SALE_RECEIVED = "sale received"
    RESERVED_AT_JACKPOT = "reserved at Jackpot"
    REFUSED = "refused"
    OUTCOME_UNKNOWN = "outcome unknown"


class Step(BaseModel):
    """One step of a voucher's journey, and the facts about the voucher it learnt.

    A step of a till's request before any voucher pays for it has only its request id.
    """

    model_config = ConfigDict(frozen=True)

    voucher_id: UUID | None
    request_id: str | None = Field(None, max_length=64)
    message_id: str = Field(min_length=1, max_length=256)
    stage: str = Field(min_length=1, max_length=32)
    attempt: int = Field(ge=0)
    outcome: str = Field(min_length=1, max_length=64)
    at_ms: int = Field(ge=0)
    detail: str | None = Field(None, max_length=DETAIL_MAX_CHARS)
    state: State | None = None
    # Columns of the voucher row this step knows (those Ledger.record reads); never secrets or
    # signed links.
    facts: dict[str, Any] = Field(default_factory=dict)

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.at_ms / 1000, UTC)


def now_ms() -> int:
    return int(time.time() * 1000)


def step(
    voucher_id: UUID | str | None,
    message_id: str,
    stage: str,
    outcome: Outcome | str,
    *,
    request_id: str | None = None,
    attempt: int = 0,
    at_ms: int | None = None,
    detail: str | None = None,
    state: State | None = None,
    facts: Mapping[str, Any] | None = None,
) -> Step:
    """A step, with its detail cut to size (a reason may quote a partner's answer)."""
    if detail is not None and len(detail) > DETAIL_MAX_CHARS:
        detail = detail[: DETAIL_MAX_CHARS - 1] + "…"
    if isinstance(voucher_id, str):
        voucher_id = UUID(voucher_id)
    if request_id is None:
        request_id = facts.get("request_id") if facts else None
    return Step(
        voucher_id=voucher_id,
        request_id=request_id,
        message_id=message_id,
        stage=stage,
        attempt=attempt,
        outcome=str(outcome),
        at_ms=now_ms() if at_ms is None else at_ms,
        detail=detail,
        state=state,
        facts=dict(facts or {}),
    )


class Steps(BaseModel):
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS_PER_MESSAGE)


def encode(steps: Sequence[Step]) -> bytes:
    return orjson.dumps({"steps": [s.model_dump(mode="json") for s in steps]})


def decode(body: bytes) -> list[Step]:
    """The steps of a journal message; one that does not parse never will (permanent)."""
    try:
        return Steps.model_validate_json(body).steps
    except ValidationError as error:
        raise PermanentError(f"not a journal message: {error.error_count()} errors") from error


@dataclass(frozen=True)
class VoucherChange:
    """What a batch of steps changes on one voucher row."""

    voucher_id: UUID
    facts: dict[str, Any]
    state: State | None
    state_at: datetime | None  # None with no state: the row's state stays as it is
    first_seen: datetime
    last_change: datetime


def changes(steps: Sequence[Step]) -> list[VoucherChange]:
    """Fold a batch of steps into one change per voucher: the latest state, every fact."""
    by_voucher: dict[UUID, list[Step]] = {}
    for s in steps:
        if s.voucher_id is not None:
            by_voucher.setdefault(s.voucher_id, []).append(s)
    result = []
    for voucher_id, own in by_voucher.items():
        own.sort(key=lambda s: (s.at_ms, RANKS[s.state] if s.state else -1))
        facts: dict[str, Any] = {}
        for s in own:
            facts.update({k: v for k, v in s.facts.items() if v is not None})
        latest: Step | None = None
        for s in own:
            if s.state is not None and moves_on(latest.state if latest else None, s.state):
                latest = s
        result.append(
            VoucherChange(
                voucher_id=voucher_id,
                facts=facts,
                state=latest.state if latest else None,
                state_at=latest.at if latest else None,
                first_seen=own[0].at,
                last_change=own[-1].at,
            )
        )
    return result


Send = Callable[[bytes], Awaitable[None]]


@dataclass
class Journal:
    """Records steps through `send` (a confirmed publish), many to a message when busy.

    `record` returns once the broker has confirmed the message holding the steps; a failed
    send fails every `record` waiting on it, so their messages are not acked.
    """

    send: Send
    # How long the first step of a message waits for others to join it. Only acks wait:
    # what a stage emits goes on at once, so a voucher's way is not slowed.
    linger_s: float = 0.0
    _pending: list[tuple[Sequence[Step], asyncio.Future[None]]] = field(default_factory=list)
    _flushing: asyncio.Task[None] | None = None

    async def record(self, steps: Sequence[Step]) -> None:
        if not steps:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((steps, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        # Let the steps of the next moments join the first message, then keep sending what
        # gathered while the last one was on its way.
        await asyncio.sleep(self.linger_s)
        while self._pending:
            batch: list[Step] = []
            waiting: list[asyncio.Future[None]] = []
            while self._pending and (
                not waiting or len(batch) + len(self._pending[0][0]) <= MAX_STEPS_PER_MESSAGE
            ):
                steps, future = self._pending.pop(0)
                batch.extend(steps)
                waiting.append(future)
            try:
                await self.send(encode(batch))
            except BaseException as error:
                for future in waiting:
                    if not future.done():
                        future.set_exception(error)
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            for future in waiting:
                if not future.done():
                    future.set_result(None)
