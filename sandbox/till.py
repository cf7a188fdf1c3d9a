"""`bridge sandbox --till WEBHOOK_URL`: sell gift cards at the sandbox till, log how each ended.

The Doshii sandbox registers WEBHOOK_URL for `card_activate` with the given Basic credentials,
then each sale creates a pending request and delivers its event there (retried like Doshii).
The bridge's intake reserves at the Jackpot sandbox, whose notifications go to the bridge's
ingress; a sale ends when its Doshii request is no longer pending (or the wait runs out).
"""

from __future__ import annotations

import asyncio

import structlog
from pydantic import SecretStr

from sandbox.doshii import CARD_ACTIVATE, Status, Webhook
from sandbox.server import Sandboxes

# The intake's deadline is 120 s by default; a sale not final well after that has failed.
SALE_WAIT_S = 300.0

log = structlog.get_logger("till")


def webhook_of(url: str, auth_pair: SecretStr) -> Webhook:
    """The `card_activate` webhook to `url` with `key:token` as its Basic credentials."""
    key, _, token = auth_pair.get_secret_value().partition(":")
    return Webhook(CARD_ACTIVATE, url, authentication_key=key, authentication_token=token)


async def sell_at_till(
    sandboxes: Sandboxes,
    webhook: Webhook,
    *,
    sales: int,
    amount_cents: int,
    wait_s: float = SALE_WAIT_S,
) -> dict[str, str]:
    """Sell `sales` cards of `amount_cents`; returns each request's final status."""
    doshii = sandboxes.doshii
    doshii.register_webhook(webhook)
    request_ids = [doshii.sell_card(amount_cents=amount_cents) for _ in range(sales)]
    deliveries = [doshii.start_delivery(request_id) for request_id in request_ids]
    endings = await asyncio.gather(*(_ending(sandboxes, rid, wait_s) for rid in request_ids))
    statuses = await asyncio.gather(*deliveries, return_exceptions=True)
    for request_id, status, delivered in zip(request_ids, endings, statuses, strict=True):
        record = doshii.requests[request_id]
        log.info(
            "till sale",
            doshii_request_id=request_id,
            amount_cents=amount_cents,
            webhook_status=delivered if isinstance(delivered, int) else repr(delivered),
            outcome=status,
            reference=record.get("reference"),
            cancelled_reason=record.get("cancelledReason"),
        )
    return dict(zip(request_ids, endings, strict=True))


async def _ending(sandboxes: Sandboxes, request_id: str, wait_s: float) -> str:
    try:
        return await sandboxes.doshii.wait_for_status(
            request_id, Status.ACTIVATED, Status.CANCELLED, timeout_s=wait_s
        )
    except TimeoutError:
        return str(sandboxes.doshii.requests[request_id]["status"])
