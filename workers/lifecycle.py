"""lifecycle (states after READY): a voucher that ended cancels the Doshii request."""

from __future__ import annotations

from shared.journal import Outcome as Step
from shared.models import VoucherState
from workers.deps import Deps
from workers.messages import cancellation, voucher_of
from workers.runner import Handler, Incoming, Outcome

ENDING_STATES = frozenset({VoucherState.CANCELED, VoucherState.EXPIRED, VoucherState.REFUNDED})


def make_handler(deps: Deps) -> Handler:
    async def handle(message: Incoming) -> Outcome:
        voucher, claims = voucher_of(message)
        if voucher.state not in ENDING_STATES:
            return Outcome(
                "ignored",
                detail=f"state {voucher.state} needs nothing from Doshii",
                step=Step.IGNORED,
            )
        reason = f"Jackpot voucher {voucher.couponId} is {voucher.state}"
        return Outcome(
            emit=[cancellation(deps.names, message, voucher, claims, reason)],
            detail=f"cancelling the Doshii request: {reason}",
            step=Step.CANCELLING,
        )

    return handle
