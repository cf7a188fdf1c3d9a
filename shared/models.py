"""What travels: Jackpot's voucher notification, the key's claims and the Doshii update message."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from shared.errors import PermanentError

# Money fields are bounded so that a hostile `1e400` is a clear 400, not an overflow later.
MAX_VALUE = Decimal(10**9)


def _json_number(value: object) -> object:
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON number")
    return value


def _json_string(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string")
    return value


# Dates are ISO 8601 strings with an offset, as Jackpot sends them; no epoch numbers.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_json_string)]

Money = Annotated[
    Decimal,
    BeforeValidator(_json_number),
    # Decimal refuses NaN and infinities by itself (in pydantic-core, unlike allow_inf_nan=False,
    # which adds a Python check on the ingress's hot path).
    Field(ge=0, le=MAX_VALUE),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": int(MAX_VALUE)}),
]
Text = Annotated[str, Field(min_length=1, max_length=128)]
# A signed S3-style link carries a long query string; 8 KiB is far beyond any real one.
SIGNED_URL_MAX_CHARS = 8192


class VoucherState(StrEnum):
    """Jackpot voucher states: the union of the two documented lists."""

    RESERVED = "RESERVED"
    CONFIRMED = "CONFIRMED"
    READY = "READY"
    SENT = "SENT"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    REFUNDING = "REFUNDING"
    REFUNDED = "REFUNDED"
    REFUND_REJECTED = "REFUND_REJECTED"


_STATES: dict[str, VoucherState] = {state.value: state for state in VoucherState}


class Route(StrEnum):
    """Routing keys on `<ns>.events`."""

    RESERVED = "voucher.reserved"
    READY = "voucher.ready"
    LIFECYCLE = "voucher.lifecycle"
    DOSHII = "doshii.update"
    CARD_ACTIVATE = "doshii.card_activate"


class Voucher(BaseModel):
    """A Jackpot voucher notification. Unknown fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: UUID
    # An unknown state is accepted as its own string and routed to the lifecycle worker; it
    # must still look like a state, since it becomes part of the AMQP message id.
    state: VoucherState | Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    value: Money
    price: Money
    reservationDate: Timestamp
    validityDate: Timestamp
    resaExpireDate: Timestamp
    couponId: Text
    signedUrl: Annotated[str, Field(max_length=SIGNED_URL_MAX_CHARS)] | None = None
    confirmDate: Timestamp | None = None
    sendDate: Timestamp | None = None

    @field_validator("state", mode="before")
    @classmethod
    def _known_state(cls, value: object) -> object:
        # A dict lookup: VoucherState(value) costs a few microseconds on the ingress's hot path.
        return _STATES.get(value, value) if isinstance(value, str) else value

    @property
    def route(self) -> Route:
        return route_for(self.state)


def route_for(state: str) -> Route:
    if state == VoucherState.RESERVED:
        return Route.RESERVED
    if state == VoucherState.READY:
        return Route.READY
    return Route.LIFECYCLE


def value_to_cents(value: Decimal, factor: int) -> int:
    """Jackpot value to Doshii cents; a fraction of a cent is a payload that cannot be right."""
    cents = value * factor
    if cents != cents.to_integral_value():
        raise PermanentError(f"value {value} x {factor} is not a whole number of cents")
    return int(cents)


class KeyClaims(BaseModel):
    """What a notificationKey carries: which Doshii request the voucher pays for, and how much."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    location_id: str = Field(alias="l", min_length=1, max_length=64)
    request_id: str = Field(alias="r", min_length=1, max_length=64)
    amount_cents: int = Field(alias="a", ge=0, le=10**11)


class DoshiiStatus(StrEnum):
    PENDING = "pending"
    ACTIVATED = "activated"
    CANCELLED = "cancelled"


class DoshiiUpdate(BaseModel):
    """The `doshii.update` message: what the doshii worker must make Doshii's request say."""

    model_config = ConfigDict(frozen=True)

    location_id: str
    request_id: str
    # None for a sale cancelled before any voucher was reserved for it.
    voucher_id: UUID | None
    coupon_id: str | None
    status: Literal[DoshiiStatus.ACTIVATED, DoshiiStatus.CANCELLED]
    amount_cents: int | None = None
    expiry_date: datetime | None = None
    reference: str | None = None
    cancelled_reason: str | None = None

    def body(self) -> dict[str, object]:
        """The JSON body of `PUT ~/loyalty/cards/activation/{id}`."""
        body: dict[str, object] = {"event": "card_activate", "status": str(self.status)}
        if self.status == DoshiiStatus.ACTIVATED:
            if self.amount_cents is None:
                raise PermanentError("an activation needs an amount")
            body["amount"] = self.amount_cents
        if self.expiry_date is not None:
            body["expiryDate"] = self.expiry_date.isoformat().replace("+00:00", "Z")
        if self.reference is not None:
            body["reference"] = self.reference
        if self.cancelled_reason is not None:
            body["cancelledReason"] = self.cancelled_reason
        return body
