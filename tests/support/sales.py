"""Doshii `card_activate` webhooks for tests, shaped like Doshii's documented example."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

WEBHOOK_KEY = "doshii-webhook-key"
WEBHOOK_TOKEN = "doshii-webhook-token-0123456789"
OLD_WEBHOOK_KEY = "doshii-webhook-old"
OLD_WEBHOOK_TOKEN = "doshii-webhook-token-old-9876543210"
WEBHOOK_AUTH = f"{WEBHOOK_KEY}:{WEBHOOK_TOKEN},{OLD_WEBHOOK_KEY}:{OLD_WEBHOOK_TOKEN}"
CREDENTIAL_FIELDS = ("cardAuthorisationKey", "cardProviderAuthId", "cardProviderAuthPassword")


def basic(key: str = WEBHOOK_KEY, token: str = WEBHOOK_TOKEN) -> dict[str, str]:
    """The headers of an authenticated webhook delivery."""
    encoded = base64.b64encode(f"{key}:{token}".encode()).decode()
    return {"Authorization": f"Basic {encoded}", "Content-Type": "application/json"}


def card_activate(
    request_id: str | None = None,
    *,
    location_id: str = "aH43yx2",
    amount: object = "2500",
    card_ref: str | None = "1234-5678-9012",
    status: str = "pending",
    **request_data: Any,
) -> dict[str, Any]:
    """A `card_activate` event; its credentials are random, so a test can grep for them."""
    rid = request_id if request_id is not None else str(100_000 + secrets.randbelow(800_000))
    data: dict[str, Any] = {
        "amount": amount,
        "cardAuthorisationKey": f"auth-{secrets.token_hex(6)}",
        "cardProviderAuthId": f"user-{secrets.token_hex(6)}",
        "cardProviderAuthPassword": f"pw-{secrets.token_hex(8)}",
    }
    if card_ref is not None:
        data["cardRef"] = card_ref
    data.update(request_data)
    return {
        "event": "card_activate",
        "data": {
            "id": rid,
            "locationId": location_id,
            "status": status,
            "posTerminalId": "23fd46",
            "requestData": data,
            "uri": f"https://sandbox.doshii.co/partner/v3/loyalty/cards/activation/{rid}",
        },
    }


def credentials(event: dict[str, Any]) -> list[str]:
    """The card provider's credentials an event carries: never logged, published or stored."""
    data = event["data"]["requestData"]
    return [str(data[name]) for name in CREDENTIAL_FIELDS if name in data]


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
