"""Decoding deliveries and building the messages workers emit."""

from __future__ import annotations

from pydantic import ValidationError

from shared import envelope
from shared.broker import Outgoing
from shared.errors import PermanentError
from shared.models import DoshiiUpdate, KeyClaims, Route, Voucher
from shared.topology import Names
from workers.runner import Incoming


def voucher_of(message: Incoming) -> tuple[Voucher, KeyClaims]:
    """The voucher and the key's claims; a body that is not a voucher cannot become one later."""
    try:
        voucher = Voucher.model_validate_json(message.body)
    except ValidationError as error:
        raise PermanentError(
            f"body is not a Jackpot voucher: {error.error_count()} errors"
        ) from error
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
