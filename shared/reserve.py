"""Reserving a voucher at Jackpot for a till's sale: the pure part, no I/O.

Amounts: Doshii speaks cents, Jackpot its own units (`BRIDGE_VALUE_TO_CENTS` cents each). The
session JWT's claims, the reserve route and body, the token answer's shapes, how a refusal is
read, and the reason the till shows are all decided here; `shared.partners` does the calls.
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum

from shared.errors import PermanentError
from shared.settings import ReserveBy

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Jackpot's token answer is undocumented: the first of these that holds a string wins.
TOKEN_FIELDS = ("access_token", "accessToken", "token")
CENTS_PER_CURRENCY_UNIT = 100


class RefusalKind(StrEnum):
    """Why Jackpot will not reserve: each is a business outcome, the sale is cancelled."""

    OUT_OF_STOCK = "out_of_stock"
    NO_SUCH_OFFER = "no_such_offer"
    AMOUNT_NOT_ALLOWED = "amount_not_allowed"
    REFUSED = "refused"  # any other 4xx that cannot be explained


_REASON_ENDINGS = {
    RefusalKind.OUT_OF_STOCK: "out of stock",
    RefusalKind.NO_SUCH_OFFER: "offer not found",
    RefusalKind.AMOUNT_NOT_ALLOWED: "amount not allowed",
    RefusalKind.REFUSED: "refused by the supplier",
}
SUPPLIER_UNAVAILABLE = "supplier unavailable"


class JackpotRefusal(PermanentError):
    """Jackpot refused the reservation; `reason` is what the till shows (Doshii's reason)."""

    def __init__(self, kind: RefusalKind, amount_cents: int, status: int, detail: str) -> None:
        self.kind = kind
        self.amount_cents = amount_cents
        self.status = status
        self.detail = detail
        self.reason = refusal_reason(kind, amount_cents)
        super().__init__(f"Jackpot reserve: HTTP {status}: {kind}: {detail}")


def money_text(cents: int) -> str:
    """`2500` -> `25.00`: how the till shows an amount."""
    units, rest = divmod(cents, CENTS_PER_CURRENCY_UNIT)
    return f"{units}.{rest:02d}"


def refusal_reason(kind: RefusalKind, amount_cents: int) -> str:
    """`No voucher available for 25.00: out of stock`."""
    return f"No voucher available for {money_text(amount_cents)}: {_REASON_ENDINGS[kind]}"


def unavailable_reason(amount_cents: int) -> str:
    """The reason once Jackpot failed past BRIDGE_INTAKE_DEADLINE_S: `...: supplier unavailable`."""
    return f"No voucher available for {money_text(amount_cents)}: {SUPPLIER_UNAVAILABLE}"


def cents_to_units(cents: int, factor: int) -> Decimal:
    """Doshii cents to Jackpot units (`factor` cents each); ValueError unless it is exact."""
    if cents <= 0:
        raise ValueError(f"{cents} cents is not an amount to reserve")
    units = Decimal(cents) / Decimal(factor)
    if units * factor != cents:
        raise ValueError(f"{cents} cents is not a whole number of Jackpot units of {factor}")
    return units


def json_number(units: Decimal) -> int | float:
    """A Decimal as JSON (and JWT) write it: an integer when whole, else a float."""
    return int(units) if units == units.to_integral_value() else float(units)


def session_claims(
    *, amount_units: Decimal, notification_key: str, issued_at_s: int, force_manual_confirm: bool
) -> dict[str, object]:
    """The claims of a client-session JWT (`amount` is the most the session may spend)."""
    claims: dict[str, object] = {
        "amount": json_number(amount_units),
        "iat": issued_at_s,
        "notificationKey": notification_key,
    }
    if force_manual_confirm:
        claims["forceManualConfirm"] = True
    return claims


def token_request(client_id: str, assertion: str) -> dict[str, str]:
    """The body of `POST /v2/token` that exchanges a signed JWT for a session token."""
    return {"grant_type": JWT_BEARER_GRANT, "client_id": client_id, "assertion": assertion}


def token_from(answer: object) -> str | None:
    """The session token in Jackpot's answer: `access_token`, `accessToken` or `token`."""
    if not isinstance(answer, dict):
        return None
    for name in TOKEN_FIELDS:
        value = answer.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def reserve_route(store_id: str, offer_id: str, reserve_by: ReserveBy) -> str:
    """The path of the reserve call (store and offer ids come from settings, not from input)."""
    return f"/v2/stores/{store_id}/offers/{offer_id}/reserve-voucher-by-{reserve_by}"


def reserve_body(reserve_by: ReserveBy, units: Decimal) -> dict[str, int | float]:
    """`{"value": N}` or `{"price": N}` in Jackpot's units."""
    return {str(reserve_by): json_number(units)}


def _shout(text: str) -> str:
    return text.upper().replace(" ", "_").replace("-", "_")


def classify_refusal(status: int, body: str) -> RefusalKind:
    """Read a reserve 4xx: the codes are undocumented, so words in the body decide, then 404."""
    text = _shout(body)
    if "STOCK" in text or "SOLD_OUT" in text or "NO_VOUCHER" in text:
        return RefusalKind.OUT_OF_STOCK
    if status == 404 or "NOT_FOUND" in text:
        return RefusalKind.NO_SUCH_OFFER
    if any(word in text for word in ("AMOUNT", "VALUE", "PRICE")):
        return RefusalKind.AMOUNT_NOT_ALLOWED
    return RefusalKind.REFUSED


def assertion_was_used(body: str) -> bool:
    """Whether a refused token exchange says the JWT was already exchanged (replayed)."""
    text = _shout(body)
    return any(word in text for word in ("ALREADY_USED", "REPLAY", "USED_ASSERTION"))
