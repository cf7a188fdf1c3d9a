"""intake (`doshii.card_activate`): a sale at the till reserves its voucher at Jackpot, once.

One Doshii request reserves at most one voucher, whatever is redelivered or killed:
- the request is claimed in the ledger first (`INSERT ... ON CONFLICT`): a request already
  reserved, cancelled or of unknown outcome is not reserved again;
- the one-time Jackpot JWT is signed with the claim's time, so a retry signs the very same JWT,
  which Jackpot will not exchange twice: a second session, hence a second voucher, cannot be;
- where Jackpot may have reserved but the answer was lost, the request is marked `unknown`:
  the RESERVED notification carrying our key links the voucher when it comes, and the sweeper
  cancels the Doshii request with a reason if none came by the deadline.

The reserved voucher goes to the reservations stage at once, from Jackpot's answer: a lost
RESERVED notification costs nothing, and the real one is a harmless duplicate.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import structlog

from shared import envelope, journal
from shared.broker import Outgoing
from shared.errors import TransientError
from shared.intake import IntakeRequest
from shared.journal import Outcome as Step
from shared.journal import State
from shared.keys import KeyRing
from shared.models import DoshiiStatus, DoshiiUpdate, KeyClaims, Route, Voucher
from shared.partners import JackpotSessions, ReservationUnreadable, SessionEnded, SessionRefused
from shared.reserve import JackpotRefusal, refusal_reason, unavailable_reason
from shared.reserve import RefusalKind as Refusal
from workers.deps import Deps
from workers.messages import decode, doshii_message
from workers.runner import Handler, Incoming, Outcome, choose_tier

log = structlog.get_logger("intake")

STAGE = "intake"
# Request states in the ledger (`requests.state`).
CLAIMED = "claimed"
RESERVED = "reserved"
CANCELLED = "cancelled"
UNKNOWN = "unknown"
# Open sessions remembered for retries; the oldest is forgotten past this many.
MAX_OPEN_SESSIONS = 10_000


def reserved_message(deps: Deps, voucher: Voucher, claims: KeyClaims) -> Outgoing:
    """Jackpot's answer as the RESERVED notification the reservations stage takes."""
    headers = envelope.claim_headers(claims, journal.now_ms())
    headers[envelope.ORIGIN] = STAGE
    return Outgoing(
        exchange=deps.names.events,
        routing_key=Route.RESERVED,
        body=orjson.dumps(
            voucher.model_dump(mode="json")
            | {"value": _number(voucher.value), "price": _number(voucher.price)}
        ),
        message_id=f"{voucher.id}:{voucher.state}",
        correlation_id=str(voucher.id),
        headers=headers,
    )


def _number(value: object) -> object:
    """A Decimal back as the JSON number Jackpot sent (pydantic's JSON mode makes it a string)."""
    text = str(value)
    return int(text) if text.lstrip("-").isdigit() else float(text)


def make_handler(deps: Deps) -> Handler:
    settings = deps.settings
    ledger = deps.ledger
    if ledger is None:
        raise RuntimeError("the intake worker needs the ledger")
    sessions = JackpotSessions.from_settings(deps.partners, settings)
    keys = KeyRing(settings.key_secrets)
    # Sessions opened but not yet used, by request: a retry after a failed reserve uses the
    # same session (the JWT cannot open another). In memory only: a session is a credential.
    sessions_by_request: dict[str, str] = {}
    # Which delivery claimed each request this process works on (quick retries call again
    # with the same delivery; a copy of the sale comes as another).
    claiming: dict[str, int] = {}

    def remember(book: dict[str, Any], request_id: str, value: Any) -> None:
        """Keep `value` for the request; past MAX_OPEN_SESSIONS the oldest is forgotten."""
        if len(book) >= MAX_OPEN_SESSIONS:
            book.pop(next(iter(book)))
        book[request_id] = value

    def cancel(request: IntakeRequest, reason: str) -> Outgoing:
        update = DoshiiUpdate(
            location_id=request.location_id,
            request_id=request.request_id,
            voucher_id=None,
            coupon_id=None,
            status=DoshiiStatus.CANCELLED,
            cancelled_reason=reason,
        )
        return doshii_message(deps.names, update, int(request.received_at.timestamp() * 1000))

    async def cancelled(
        message: Incoming, request: IntakeRequest, reason: str, outcome: str
    ) -> Outcome:
        await ledger.settle_request(request.request_id, CANCELLED, None, reason)
        log.warning("sale_cancelled", reason=reason, doshii_request_id=request.request_id)
        return Outcome("rejected", emit=[cancel(request, reason)], detail=reason, step=outcome)

    async def handle(message: Incoming) -> Outcome:
        request = decode(IntakeRequest, message.body, "a till sale (intake request)")
        message.steps.append(
            journal.step(
                None,
                message.message_id or f"{request.request_id}:card_activate",
                "ingress",
                Step.SALE_RECEIVED,
                request_id=request.request_id,
                at_ms=int(request.received_at.timestamp() * 1000),
                detail=f"card_activate for {request.amount_cents / 100:.2f}",
            )
        )
        claim, made = await ledger.claim_request(request)
        if made:
            remember(claiming, request.request_id, id(message))
        if claim["state"] != CLAIMED:
            claiming.pop(request.request_id, None)
            detail = f"request already {claim['state']}: nothing reserved again"
            return Outcome("ignored", detail=detail, step=Step.IGNORED)
        # Claimed, but not by this delivery: another copy of the sale is at work on it. A
        # delivery that comes back (redelivered after a crash, or from a delay tier) goes on.
        mine = (
            claiming.get(request.request_id) == id(message)
            or message.redelivered
            or message.attempt > 0
        )
        if not mine:
            detail = "another delivery of this sale holds its claim: nothing reserved twice"
            return Outcome("ignored", detail=detail, step=Step.IGNORED)
        try:
            outcome = await reserve_claimed(message, request, claim)
        except TransientError:
            raise  # still claimed by this delivery: its retry goes on
        except BaseException:
            claiming.pop(request.request_id, None)
            raise
        claiming.pop(request.request_id, None)
        return outcome

    async def reserve_claimed(
        message: Incoming, request: IntakeRequest, claim: asyncpg.Record
    ) -> Outcome:
        now = datetime.now(UTC)
        deadline = request.deadline(settings.intake_deadline_s)
        if now >= deadline:
            reason = unavailable_reason(request.amount_cents)
            return await cancelled(message, request, reason, Step.CANCELLED)
        offer = settings.offer_for(request.location_id)
        if offer is None:
            reason = refusal_reason(Refusal.NO_SUCH_OFFER, request.amount_cents)
            return await cancelled(message, request, reason, Step.REFUSED)
        claims = KeyClaims(
            location_id=request.location_id,
            request_id=request.request_id,
            amount_cents=request.amount_cents,
        )
        try:
            token = sessions_by_request.get(request.request_id)
            if token is None:
                assertion = sessions.assertion(
                    amount_cents=request.amount_cents,
                    notification_key=keys.mint(claims),
                    issued_at_s=int(claim["claimed_at"].timestamp()),
                )
                token = await sessions.open_session(assertion)
                remember(sessions_by_request, request.request_id, token)
            voucher = await sessions.reserve(token, offer=offer, amount_cents=request.amount_cents)
        except JackpotRefusal as refusal:
            sessions_by_request.pop(request.request_id, None)
            return await cancelled(message, request, refusal.reason, Step.REFUSED)
        except (SessionRefused, SessionEnded, ReservationUnreadable) as error:
            sessions_by_request.pop(request.request_id, None)
            first_try = not message.attempt and not message.redelivered
            if isinstance(error, SessionRefused) and not error.assertion_used and first_try:
                # Jackpot refused a JWT never sent before: nothing can exist for it.
                reason = refusal_reason(Refusal.REFUSED, request.amount_cents)
                return await cancelled(message, request, reason, Step.REFUSED)
            await ledger.settle_request(request.request_id, UNKNOWN, None, str(error))
            detail = (
                f"Jackpot may have reserved ({error}): the RESERVED notification links it, "
                "or the sweeper cancels the request after the deadline"
            )
            log.warning("reservation_unknown", detail=detail)
            return Outcome("done", detail=detail, step=Step.OUTCOME_UNKNOWN)
        except TransientError:
            # Retry only if the next delay tier still ends before the deadline.
            next_delay_s = choose_tier(settings.retry_tiers_s, message.attempt, None)
            waited_s = (now - request.received_at).total_seconds()
            if next_delay_s is None or waited_s + next_delay_s > settings.intake_deadline_s:
                sessions_by_request.pop(request.request_id, None)
                reason = unavailable_reason(request.amount_cents)
                return await cancelled(message, request, reason, Step.CANCELLED)
            raise
        sessions_by_request.pop(request.request_id, None)
        await ledger.settle_request(request.request_id, RESERVED, voucher.id, None)
        detail = f"voucher {voucher.couponId} reserved at Jackpot (store {offer.store_id})"
        return Outcome(
            emit=[reserved_message(deps, voucher, claims)],
            detail=detail,
            step=Step.RESERVED_AT_JACKPOT,
            state=State.RESERVED,
            voucher_id=voucher.id,
        )

    return handle
