"""Decoding deliveries and building the messages workers emit."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from shared import envelope, journal
from shared.broker import Outgoing
from shared.errors import PermanentError
from shared.journal import State, Step
from shared.models import DoshiiStatus, DoshiiUpdate, KeyClaims, Route, Voucher, VoucherState
from shared.topology import Names
from workers.runner import Incoming

Model = TypeVar("Model", bound=BaseModel)


def decode(model: type[Model], body: bytes, what: str) -> Model:
    """Parse a message body; one that does not parse now never will, so that is permanent."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise PermanentError(f"body is not {what}: {error.error_count()} errors") from error


def voucher_of(message: Incoming) -> tuple[Voucher, KeyClaims]:
    """The voucher and the key's claims the ingress put beside it.

    Records the notification's arrival as the journey's `received` step, with what it says
    about the voucher.
    """
    voucher = decode(Voucher, message.body, "a Jackpot voucher")
    claims = envelope.claims_from(message.headers)
    message.steps.append(received(message, voucher, claims))
    return voucher, claims


# The notifications that move a voucher along; the others are recorded without a new state.
RECEIVED_STATES = {VoucherState.RESERVED: State.RESERVED, VoucherState.READY: State.READY}


def voucher_facts(voucher: Voucher, claims: KeyClaims, body: bytes) -> dict[str, Any]:
    """What a notification tells the ledger; its signed link is left out (it is a credential)."""
    notification = orjson.loads(body)
    notification.pop("signedUrl", None)
    return {
        "coupon_id": voucher.couponId,
        "location_id": claims.location_id,
        "request_id": claims.request_id,
        "amount_cents": claims.amount_cents,
        "jackpot_value": str(voucher.value),
        "jackpot_price": str(voucher.price),
        "jackpot_state": str(voucher.state),
        "validity_date": voucher.validityDate.isoformat(),
        "resa_expire_date": voucher.resaExpireDate.isoformat(),
        "notification": notification,
    }


def received(message: Incoming, voucher: Voucher, claims: KeyClaims) -> Step:
    """The ingress's part of the journey: when the notification came, and what it said."""
    at_ms = message.headers.get(envelope.RECEIVED_MS)
    origin = message.headers.get(envelope.ORIGIN)
    return journal.step(
        voucher.id,
        message.message_id or f"{voucher.id}:{voucher.state}",
        origin if isinstance(origin, str) else "ingress",
        journal.Outcome.RECEIVED,
        at_ms=at_ms if isinstance(at_ms, int) else None,
        detail=f"{voucher.state} notification",
        state=RECEIVED_STATES.get(voucher.state),  # type: ignore[call-overload]
        facts=voucher_facts(voucher, claims, message.body),
    )


def doshii_update(names: Names, message: Incoming, update: DoshiiUpdate) -> Outgoing:
    """A `doshii.update` message that keeps the ingress's receive time for latency metrics."""
    received = message.headers.get(envelope.RECEIVED_MS)
    return doshii_message(names, update, received if isinstance(received, int) else None)


def doshii_message(names: Names, update: DoshiiUpdate, received_ms: int | None) -> Outgoing:
    """A `doshii.update` message, with the time its story began when there is one."""
    headers: dict[str, str | int] = {
        envelope.LOCATION: update.location_id,
        envelope.REQUEST: update.request_id,
    }
    if received_ms is not None:
        headers[envelope.RECEIVED_MS] = received_ms
    return Outgoing(
        exchange=names.events,
        routing_key=Route.DOSHII,
        body=update.model_dump_json().encode(),
        message_id=f"{update.voucher_id or 'request-' + update.request_id}:doshii:{update.status}",
        correlation_id=str(update.voucher_id) if update.voucher_id else None,
        headers=headers,
    )


def cancellation(
    names: Names, message: Incoming, voucher: Voucher, claims: KeyClaims, reason: str
) -> Outgoing:
    """A `doshii.update` that cancels the request this voucher was for, with the reason."""
    update = DoshiiUpdate(
        location_id=claims.location_id,
        request_id=claims.request_id,
        voucher_id=voucher.id,
        coupon_id=voucher.couponId,
        status=DoshiiStatus.CANCELLED,
        reference=voucher.couponId,
        cancelled_reason=reason,
    )
    return doshii_update(names, message, update)
