"""Voucher payloads and keys for tests, shaped like Jackpot's documented examples."""

from __future__ import annotations

import json
import uuid
from typing import Any

from shared.keys import KeyRing
from shared.models import KeyClaims
from tests.conftest import TEST_SECRETS

KEYS = KeyRing(TEST_SECRETS)


def voucher(state: str = "RESERVED", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "state": state,
        "value": 110,
        "price": 150,
        "reservationDate": "2017-06-24T15:27:32.502Z",
        "validityDate": "2018-01-31T00:00:00.000Z",
        "resaExpireDate": "2017-06-26T15:27:37.502Z",
        "couponId": "AGYPMNVXPJ",
    }
    if state == "READY":
        body |= {
            "signedUrl": "https://jackpot-vouchers.example/v.pdf?X-Amz-Signature=abc",
            "confirmDate": "2017-06-24T15:27:32.502Z",
            "sendDate": "2017-06-24T17:27:32.502Z",
        }
    body.update(fields)
    return body


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def key(location: str = "aH43yx2", request: str = "req-1", amount_cents: int = 11000) -> str:
    return KEYS.mint(KeyClaims(location_id=location, request_id=request, amount_cents=amount_cents))
