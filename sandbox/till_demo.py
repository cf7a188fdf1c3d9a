"""The demo's second half: cards sold at the till, each followed to its end in the ledger.

Each case sells one card at the Doshii sandbox, which delivers `card_activate` to the bridge's
webhook; the bridge reserves at the Jackpot sandbox and the chain finishes the card. Cases run
one after another, since each sets the sandboxes' faults for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sandbox.catalogue import DEFAULT_OFFER_ID, DEFAULT_STORE_ID
from sandbox.doshii import Status
from sandbox.faults import Fault, FaultRoute
from sandbox.server import Sandboxes
from shared.errors import InvalidKey
from shared.keys import KeyRing
from shared.ledger import Ledger
from shared.settings import Settings

# How long one sale may take to end (the intake retries Jackpot for BRIDGE_INTAKE_DEADLINE_S).
SALE_TIMEOUT_S = 60.0
# How long the ledger may take to write a finished sale's last steps.
LEDGER_SETTLE_S = 15.0


@dataclass(frozen=True)
class TillCase:
    name: str
    amount_cents: int
    expected: str  # activated, or the cancelled reason the till must show
    deliveries: int = 1
    prepare: Callable[[Sandboxes], None] = lambda sandboxes: None
    undo: Callable[[Sandboxes], None] = lambda sandboxes: None


def _stock(count: int) -> Callable[[Sandboxes], None]:
    def set_stock(sandboxes: Sandboxes) -> None:
        sandboxes.jackpot.catalogue[DEFAULT_STORE_ID].offers[DEFAULT_OFFER_ID].stock = count

    return set_stock


def _fault(route: FaultRoute, fault: Fault) -> Callable[[Sandboxes], None]:
    return lambda sandboxes: sandboxes.faults.set(route, fault)


CASES = (
    TillCase("sale", 2500, "activated"),
    TillCase(
        "out of stock",
        5000,
        "No voucher available for 50.00: out of stock",
        prepare=_stock(0),
        undo=_stock(100_000),
    ),
    TillCase("webhook sent 3 times", 3000, "activated", deliveries=3),
    TillCase(
        "expired link",
        4000,
        "activated",
        prepare=_fault(FaultRoute.JACKPOT_PDF, Fault(status=403, times=1)),
    ),
    TillCase(
        "Doshii 503 x2",
        6000,
        "activated",
        prepare=_fault(FaultRoute.DOSHII_PUT, Fault(status=503, times=2)),
    ),
)


@dataclass(frozen=True)
class TillRow:
    case: TillCase
    request_id: str
    status: str
    outcome: str  # the amount activated, or the reason the till shows
    vouchers: int  # reserved at Jackpot for this request
    journey: str
    problem: str | None


async def _ended(sandboxes: Sandboxes, request_id: str) -> str:
    async with asyncio.timeout(SALE_TIMEOUT_S):
        return await sandboxes.doshii.wait_for_status(
            request_id, Status.ACTIVATED, Status.CANCELLED, timeout_s=SALE_TIMEOUT_S
        )


async def _journey(ledger: Ledger, request_id: str, final: str) -> list[str]:
    """The request's steps from the ledger, once it has the final one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEDGER_SETTLE_S
    while True:
        rows = await ledger.find(request_id)
        if rows:
            steps = await ledger.journey(rows[0]["voucher_id"], request_id)
        else:
            steps = await ledger.fetch("request_journey", request_id)
        words = [f"{step['stage']}: {step['outcome']}" for step in steps]
        if (words and words[-1] == f"doshii: {final}") or loop.time() > deadline:
            return words
        await asyncio.sleep(0.1)


async def sell(sandboxes: Sandboxes, settings: Settings) -> list[TillRow]:
    """Play every case; the ledger says how each went."""
    rows = []
    keys = KeyRing(settings.key_secrets)
    async with Ledger.open(settings, max_size=1) as ledger:
        for case in CASES:
            case.prepare(sandboxes)
            try:
                request_id = sandboxes.doshii.sell_card(amount_cents=case.amount_cents)
                await asyncio.gather(
                    *(sandboxes.doshii.deliver_sale(request_id) for _ in range(case.deliveries))
                )
                status = await _ended(sandboxes, request_id)
            finally:
                case.undo(sandboxes)
            rows.append(await _row(sandboxes, ledger, keys, case, request_id, status))
    return rows


def reserved_for(sandboxes: Sandboxes, keys: KeyRing, request_id: str) -> list[dict[str, Any]]:
    """The vouchers Jackpot reserved for a request: those whose key names it."""
    found = []
    for voucher_id, voucher in sandboxes.jackpot.vouchers.items():
        key = parse_qs(urlsplit(sandboxes.jackpot.notification_url(voucher_id)).query)
        with contextlib.suppress(KeyError, ValueError, InvalidKey):
            if keys.verify(key["notificationKey"][0]).request_id == request_id:
                found.append(voucher)
    return found


async def _row(
    sandboxes: Sandboxes,
    ledger: Ledger,
    keys: KeyRing,
    case: TillCase,
    request_id: str,
    status: str,
) -> TillRow:
    record = sandboxes.doshii.requests[request_id]
    if status == Status.ACTIVATED:
        outcome = f"{int(record['amount']) / 100:.2f}"
        wanted = case.expected == "activated"
    else:
        outcome = str(record.get("cancelledReason"))
        wanted = outcome == case.expected
    vouchers = len(reserved_for(sandboxes, keys, request_id))
    steps = await _journey(ledger, request_id, str(status))
    problem = None
    if not wanted:
        problem = f"expected {case.expected}, got {status} ({outcome})"
    elif case.deliveries > 1 and vouchers != 1:
        problem = f"{case.deliveries} deliveries reserved {vouchers} vouchers"
    elif case.name == "expired link" and "pdfs: link renewed" not in steps:
        problem = "the refused link was not renewed"
    return TillRow(case, request_id, str(status), outcome, vouchers, " > ".join(steps), problem)
