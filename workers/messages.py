"""Decoding deliveries and building the messages workers emit."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from shared import envelope
from shared.broker import Outgoing
from shared.errors import PermanentError
from shared.models import DoshiiStatus, DoshiiUpdate, KeyClaims, Route, Voucher
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
    """The voucher and the key's claims the ingress put beside it."""
    voucher = decode(Voucher, message.body, "a Jackpot voucher")
    return voucher, envelope.claims_from(message.headers)


def doshii_update(names: Names, message: Incoming, update: DoshiiUpdate) -> Outgoing:
    """A `doshii.update` message that keeps the ingress's receive time for latency metrics."""
    headers: dict[str, str | int] = {
        envelope.LOCATION: update.location_id,
        envelope.REQUEST: update.request_id,
    }
    received = message.headers.get(envelope.RECEIVED_MS)
    if isinstance(received, int):
        headers[envelope.RECEIVED_MS] = received
    return Outgoing(
        exchange=names.events,
        routing_key=Route.DOSHII,
        body=update.model_dump_json().encode(),
        message_id=f"{update.voucher_id}:doshii:{update.status}",
        correlation_id=str(update.voucher_id),
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
