"""The till's sale: Doshii's `card_activate` webhook, and the intake message made from it.

Doshii sends `{"event": "card_activate", "data": {"id", "locationId", "status": "pending",
"posTerminalId", "requestData": {"cardRef", "amount", ...credentials}, "uri"}}` once per sale
(and again on every retry). `requestData` is never sent again, so what the chain needs of it
travels in the `IntakeRequest` message; the card provider's credentials in it are dropped here
and `cardRef` survives only as a keyed hash and its last four characters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

CARD_ACTIVATE = "card_activate"
PENDING = "pending"
# The key's claims allow this much; no gift card comes near it (a billion currency units).
MAX_AMOUNT_CENTS = 10**11
# Derives the card-ref key from the first key secret: a card hash can never be mistaken for
# (or help forge) a notificationKey MAC, which the same secret signs under another label.
CARD_REF_PURPOSE = b"voucher-bridge card-ref hash v1"
CARD_REF_HASH_PREFIX = "v1."
CARD_REF_MAX_CHARS = 128
LAST_CHARS = 4


def _id_text(value: object) -> object:
    # Doshii's ids are strings ("1354"); a number is the same id, a bool is not.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _whole_cents(value: object) -> object:
    """Doshii sends `amount` as a string of whole cents ("2500"); an integer is tolerated."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError('must be a whole number of cents, as a string of digits such as "2500"')
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError(f'must be a whole number of cents such as "2500", not {value[:32]!r}')
        if len(value) > len(str(MAX_AMOUNT_CENTS)):
            raise ValueError(f"must be at most {MAX_AMOUNT_CENTS} cents")
        return int(value)
    return value


# Ids go into URLs (`~/loyalty/cards/activation/{id}`) and message ids: nothing but these.
DoshiiId = Annotated[str, BeforeValidator(_id_text), Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Cents = Annotated[int, BeforeValidator(_whole_cents), Field(ge=1, le=MAX_AMOUNT_CENTS)]


class WebhookEnvelope(BaseModel):
    """Any Doshii webhook: an event name and its data. No event is Doshii's verification check."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event: Annotated[str, Field(max_length=64)] | None = None
    data: Any = None


class CardRequestData(BaseModel):
    """What the till put in the request. Unknown fields and the credentials are dropped."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    amount: Cents
    cardRef: Annotated[str, Field(min_length=1, max_length=CARD_REF_MAX_CHARS)] | None = None


class CardActivate(BaseModel):
    """The `data` of a `card_activate` event."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: DoshiiId
    locationId: DoshiiId
    status: Annotated[str, Field(min_length=1, max_length=32)]
    posTerminalId: Annotated[str, BeforeValidator(_id_text), Field(max_length=64)] | None = None
    requestData: CardRequestData


class CardRefHasher:
    """Keyed hashes of card references: HMAC-SHA256 under a key derived from one secret."""

    def __init__(self, secret: SecretStr | str) -> None:
        raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        key = hmac.new(raw.encode(), CARD_REF_PURPOSE, hashlib.sha256).digest()
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def __call__(self, card_ref: str) -> str:
        mac = self._mac.copy()
        mac.update(card_ref.encode())
        digest = base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")
        return f"{CARD_REF_HASH_PREFIX}{digest}"


class IntakeRequest(BaseModel):
    """The `doshii.card_activate` message on `<ns>.intake`: one till sale to reserve for.

    Its AMQP message id is `intake_message_id(request_id)`, so Doshii's retries of one event
    are the same message id; the intake worker must still claim the request (the ledger).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    location_id: str
    amount_cents: int = Field(ge=1, le=MAX_AMOUNT_CENTS)
    pos_terminal_id: str | None = None
    card_ref_hash: str | None = None
    card_ref_last4: str | None = None
    # When the ingress took the event: BRIDGE_INTAKE_DEADLINE_S counts from here.
    received_at: AwareDatetime

    def deadline(self, deadline_s: float) -> datetime:
        """The moment past which the sale is cancelled ("supplier unavailable")."""
        return self.received_at + timedelta(seconds=deadline_s)


def intake_message_id(request_id: str) -> str:
    """`<requestId>:card_activate`, like `<voucherId>:<state>` for Jackpot's notifications."""
    return f"{request_id}:{CARD_ACTIVATE}"


def intake_request(
    sale: CardActivate, hasher: CardRefHasher, received_at: datetime
) -> IntakeRequest:
    """The message for a pending `card_activate`: no credential, the card ref only hashed."""
    card_ref = sale.requestData.cardRef
    return IntakeRequest(
        request_id=sale.id,
        location_id=sale.locationId,
        amount_cents=sale.requestData.amount,
        pos_terminal_id=sale.posTerminalId,
        card_ref_hash=hasher(card_ref) if card_ref else None,
        card_ref_last4=card_ref[-LAST_CHARS:] if card_ref else None,
        received_at=received_at,
    )
