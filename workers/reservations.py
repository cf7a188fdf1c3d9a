"""reservations (`voucher.reserved`): check the voucher against the key, then confirm at Jackpot."""

from __future__ import annotations

import structlog

from shared.journal import Outcome as Step
from shared.journal import State
from shared.models import DoshiiStatus, KeyClaims, Voucher, value_to_cents
from shared.settings import ConfirmMode
from workers.deps import Deps
from workers.messages import cancellation, voucher_of
from workers.runner import Handler, Incoming, Outcome

log = structlog.get_logger("reservations")


def mismatch(voucher: Voucher, claims: KeyClaims, value_to_cents_factor: int) -> str | None:
    """Why this voucher cannot pay for the request the key names, or None when it can."""
    cents = value_to_cents(voucher.value, value_to_cents_factor)
    if cents != claims.amount_cents:
        return (
            f"voucher {voucher.couponId} is worth {cents} cents, "
            f"the request asked for {claims.amount_cents}"
        )
    return None


def make_handler(deps: Deps) -> Handler:
    settings = deps.settings

    async def handle(message: Incoming) -> Outcome:
        voucher, claims = voucher_of(message)
        voucher_id = str(voucher.id)
        problem = mismatch(voucher, claims, settings.value_to_cents)
        request = await deps.doshii.get(claims.location_id, claims.request_id)
        status = request.get("status")

        if problem is not None:
            await deps.jackpot.cancel(voucher_id)
            emit = []
            if status == DoshiiStatus.PENDING:
                reason = f"Gift card not issued: {problem}"
                emit.append(cancellation(deps.names, message, voucher, claims, reason))
            log.warning("reservation_rejected", reason=problem, coupon_id=voucher.couponId)
            return Outcome(
                "rejected", emit=emit, detail=problem, step=Step.REJECTED, state=State.REJECTED
            )

        if status != DoshiiStatus.PENDING:
            if status == DoshiiStatus.ACTIVATED and request.get("reference") == voucher.couponId:
                return Outcome(
                    detail="request already activated with this voucher", step=Step.IGNORED
                )
            await deps.jackpot.cancel(voucher_id)
            reason = f"Doshii request {claims.request_id} is {status}, voucher cancelled"
            log.warning("reservation_rejected", reason=reason, coupon_id=voucher.couponId)
            return Outcome("rejected", detail=reason, step=Step.REJECTED, state=State.REJECTED)

        if settings.jackpot_confirm is ConfirmMode.NOTIFICATION:
            detail = "agreed by the ingress's answer"
        else:
            confirmed = await deps.jackpot.confirm(voucher_id)
            detail = "confirmed at Jackpot" if confirmed else "already confirmed at Jackpot"
        return Outcome(detail=detail, step=Step.CONFIRMED, state=State.CONFIRMED)

    return handle
