"""What the ledger says about a test's vouchers."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.journal import State
from shared.ledger import Ledger
from tests.support.pipeline import Voucher

# The journey of a voucher that went through without a hitch: (stage, outcome) in order.
HAPPY = [
    ("ingress", "received"),
    ("reservations", "confirmed"),
    ("ingress", "received"),
    ("pdfs", "PDF stored"),
    ("pdfs", "activated"),
]


async def wait_state(
    ledger: Ledger, voucher_id: str, *states: State, timeout_s: float = 30
) -> dict[str, Any]:
    """The voucher's row once its state is one of `states`."""

    async def poll() -> dict[str, Any]:
        while True:
            rows = await ledger.find(voucher_id)
            if rows and rows[0]["state"] in states:
                return dict(rows[0])
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), timeout_s)


async def outcomes(ledger: Ledger, voucher: Voucher) -> list[tuple[str, str]]:
    rows = await ledger.find(voucher.voucher_id)
    journey = await ledger.journey(rows[0]["voucher_id"])
    return [(step["stage"], step["outcome"]) for step in journey]
