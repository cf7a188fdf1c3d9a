"""doshii (`doshii.update`): make Doshii's activation request say what the update says.

Cancellations come this way; an activation is pushed by the pdfs worker itself, with `push`,
once the PDF is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from shared import envelope, metrics
from shared.errors import PermanentError
from shared.journal import Outcome as Step
from shared.journal import State
from shared.models import DoshiiStatus, DoshiiUpdate
from shared.partners import PartnerRefused
from workers.deps import Deps
from workers.messages import decode
from workers.runner import Handler, Incoming, Outcome

# Doshii answers these when an update does not fit the request's state: look before giving up.
EXPLAINABLE_STATUSES = frozenset({400, 409})


def already_done(record: dict[str, Any], update: DoshiiUpdate) -> bool:
    """Whether Doshii's request already says what the update wants."""
    if record.get("status") != update.status:
        return False
    if update.status == DoshiiStatus.ACTIVATED:
        return str(record.get("amount")) == str(update.amount_cents) and (
            update.reference is None or record.get("reference") == update.reference
        )
    return True


def why_not(record: dict[str, Any], update: DoshiiUpdate) -> str:
    status = record.get("status")
    if status == DoshiiStatus.CANCELLED and update.status == DoshiiStatus.ACTIVATED:
        return (
            f"Doshii request {update.request_id} was cancelled at the till but voucher "
            f"{update.coupon_id} is paid: refund it by hand"
        )
    if status == DoshiiStatus.ACTIVATED and update.status == DoshiiStatus.CANCELLED:
        return (
            f"Doshii request {update.request_id} is activated but voucher {update.coupon_id} "
            f"ended ({update.cancelled_reason}): deactivate the card by hand"
        )
    return f"Doshii request {update.request_id} is {status}, cannot become {update.status}"


async def push(deps: Deps, update: DoshiiUpdate, headers: Mapping[str, Any]) -> Outcome:
    """PUT the update at Doshii; a refusal that Doshii's own record explains is success."""
    try:
        await deps.doshii.put(update.location_id, update.request_id, update.body())
        detail = str(update.status)
    except PartnerRefused as refused:
        if refused.status not in EXPLAINABLE_STATUSES:
            raise
        record = await deps.doshii.get(update.location_id, update.request_id)
        if not already_done(record, update):
            raise PermanentError(f"{why_not(record, update)} ({refused})") from refused
        detail = f"already {update.status}"
    received = envelope.received_at(headers)
    if received is not None:
        latency_s = (datetime.now(UTC) - received).total_seconds()
        metrics.NOTIFICATION_TO_DOSHII_SECONDS.observe(latency_s)
    activated = update.status == DoshiiStatus.ACTIVATED
    if update.cancelled_reason:
        detail = f"{detail}: {update.cancelled_reason}"
    return Outcome(
        detail=detail,
        step=Step.ACTIVATED if activated else Step.CANCELLED,
        state=State.ACTIVATED if activated else State.CANCELLED,
        facts={"doshii_status": str(update.status)},
    )


def make_handler(deps: Deps) -> Handler:
    async def handle(message: Incoming) -> Outcome:
        update = decode(DoshiiUpdate, message.body, "a Doshii update")
        return await push(deps, update, message.headers)

    return handle
