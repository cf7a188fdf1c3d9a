"""What travels around a message body: header names, and claims to and from headers."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from shared.errors import PermanentError
from shared.models import KeyClaims

LOCATION = "x-doshii-location-id"
REQUEST = "x-doshii-request-id"
AMOUNT_CENTS = "x-amount-cents"
RECEIVED_MS = "x-received-at-ms"
ATTEMPT = "x-bridge-attempt"
FIRST_FAILURE = "x-bridge-first-failure"
LAST_FAILURE = "x-bridge-last-failure"
REASON = "x-bridge-reason"
STAGE = "x-bridge-stage"
QUEUE = "x-bridge-queue"
# Who made a message that did not come through the ingress (the sweeper's READY, say).
ORIGIN = "x-bridge-origin"


def claim_headers(claims: KeyClaims, received_ms: int) -> dict[str, str | int]:
    return {
        LOCATION: claims.location_id,
        REQUEST: claims.request_id,
        AMOUNT_CENTS: claims.amount_cents,
        RECEIVED_MS: received_ms,
    }


def claims_from(headers: Mapping[str, Any]) -> KeyClaims:
    """The key's claims the ingress put in the headers; a message without them cannot be right."""
    try:
        return KeyClaims(
            location_id=str(headers[LOCATION]),
            request_id=str(headers[REQUEST]),
            amount_cents=int(headers[AMOUNT_CENTS]),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise PermanentError(f"message lacks the key's claims in its headers: {error}") from error


def received_at(headers: Mapping[str, Any]) -> datetime | None:
    value = headers.get(RECEIVED_MS)
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, UTC)
    return None


def attempt_of(headers: Mapping[str, Any]) -> int:
    value = headers.get(ATTEMPT, 0)
    return value if isinstance(value, int) else 0
