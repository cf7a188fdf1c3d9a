"""sweeper: find what is stuck in the ledger, ask the partner for the truth, and act on it.

One sweeper acts at a time however many replicas run: each sweep holds a PostgreSQL advisory
lock named for the namespace, and a replica that cannot take it skips that sweep. Every effect
is recorded as a journey step before the lock is released, so the next sweep, here or on
another replica, never repeats it.

- Confirmed, but no READY after BRIDGE_SWEEP_READY_AFTER_S: ask Jackpot for a signed link. A
  link means READY: the voucher goes to the pdfs stage exactly as a READY notification would.
  No link: ask again later; past BRIDGE_SWEEP_GIVE_UP_S, dead-letter it with what to do.
- Reserved, never confirmed, past its resaExpireDate: expired; the Doshii request is cancelled.
- Activated, but Doshii now says the request is cancelled: a paid voucher on a cancelled card,
  raised for a refund (a metric and a dead letter).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import structlog
from aio_pika.abc import AbstractChannel

from shared import envelope, journal, metrics, topology
from shared.broker import Outgoing, connect
from shared.errors import TransientError
from shared.journal import Outcome as Step
from shared.journal import State
from shared.ledger import QUERIES, Ledger
from shared.models import DoshiiStatus, DoshiiUpdate, KeyClaims, Route, VoucherState
from shared.partners import PartnerRefused
from shared.reserve import unavailable_reason
from shared.settings import Settings
from shared.topology import Names, Stage
from workers.deps import Deps
from workers.messages import doshii_message

log = structlog.get_logger("sweeper")

Row = asyncpg.Record

STAGE = "sweeper"
# Vouchers looked at per kind and sweep: a backlog is worked off over several sweeps.
SWEEP_BATCH = 200


@dataclass
class SweepReport:
    """What one sweep did, by outcome (empty when another replica held the lock)."""

    acted: bool = False
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        metrics.SWEEP_OUTCOMES.labels(outcome).inc()


def lock_name(namespace: str) -> str:
    return f"voucher-bridge sweeper {namespace}"


def claims_of(row: Row) -> KeyClaims:
    return KeyClaims(
        location_id=row["location_id"],
        request_id=row["request_id"],
        amount_cents=row["amount_cents"],
    )


def give_up_reason(row: Row, hours: float) -> str:
    return (
        f"voucher {row['coupon_id']} was confirmed {hours:.1f} h ago and Jackpot still has no "
        "PDF for it: ask Jackpot support, then `bridge dlq replay` it (the pdfs stage fetches "
        "a fresh link) or refund it by hand"
    )


def refund_reason(row: Row) -> str:
    return (
        f"paid voucher, cancelled card: Doshii request {row['request_id']} was cancelled at "
        f"the till after voucher {row['coupon_id']} was paid: refund it by hand"
    )


class Sweeper:
    """Sweeps every BRIDGE_SWEEP_INTERVAL_S; `sweep()` is one pass."""

    def __init__(self, settings: Settings, ledger: Ledger, deps: Deps) -> None:
        self.settings = settings
        self.ledger = ledger
        self.deps = deps
        self.names = Names(settings.namespace)

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        while not stop.is_set():
            try:
                report = await self.sweep()
                if report.acted:
                    log.info("swept", **report.outcomes)
            except Exception as error:
                # PostgreSQL, the broker or a partner away: the next sweep tries again.
                log.warning("sweep_failed", error=f"{type(error).__name__}: {error}")
                metrics.SWEEP_OUTCOMES.labels("failed").inc()
            if once:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.sweep_interval_s)

    async def sweep(self) -> SweepReport:
        """One pass, if this replica takes the lock; every effect recorded before it is let go."""
        report = SweepReport()
        name = lock_name(self.settings.namespace)
        async with self.ledger.pool.acquire() as holder:
            if not await holder.fetchval(QUERIES["try_sweep_lock"], name):
                return report
            try:
                report.acted = True
                connection = await connect(self.settings, "sweeper")
                async with connection:
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    await topology.declare(
                        channel,
                        self.settings.namespace,
                        tiers_s=self.settings.retry_tiers_s,
                        delivery_limit=self.settings.delivery_limit,
                    )
                    await self._never_ready(channel, report)
                    await self._unresolved_sales(channel, report)
                    await self._expired(channel, report)
                    await self._cancelled_after_payment(channel, report)
                await self._gauges()
            finally:
                await holder.fetchval(QUERIES["sweep_unlock"], name)
        return report

    async def _publish(self, channel: AbstractChannel, outgoing: Outgoing) -> None:
        exchange = await channel.get_exchange(outgoing.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                outgoing.body,
                headers=dict(outgoing.headers),
                message_id=outgoing.message_id,
                correlation_id=outgoing.correlation_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=outgoing.routing_key,
            mandatory=True,
        )

    async def _record(
        self,
        row: Row,
        outcome: Step,
        detail: str,
        *,
        state: State | None = None,
        attempt: int = 0,
        at_ms: int | None = None,
    ) -> None:
        await self.ledger.record(
            [
                journal.step(
                    row["voucher_id"],
                    f"{row['voucher_id']}:{STAGE}",
                    STAGE,
                    outcome,
                    request_id=row["request_id"],
                    attempt=attempt,
                    at_ms=at_ms,
                    detail=detail,
                    state=state,
                )
            ]
        )

    def _headers(self, row: Row, at_ms: int | None = None) -> dict[str, str | int]:
        headers = envelope.claim_headers(claims_of(row), at_ms or journal.now_ms())
        headers[envelope.ORIGIN] = STAGE
        return headers

    async def _never_ready(self, channel: AbstractChannel, report: SweepReport) -> None:
        rows = await self.ledger.fetch(
            "confirmed_without_ready", self.settings.sweep_ready_after_s, SWEEP_BATCH
        )
        for row in rows:
            voucher_id = str(row["voucher_id"])
            try:
                link = await self.deps.jackpot.signed_url(voucher_id)
            except PartnerRefused:
                link = None
            except TransientError as error:
                log.info("sweep_partner_unavailable", voucher_id=voucher_id, error=str(error))
                report.count("partner unavailable")
                continue
            notification = dict(row["notification"] or {})
            if link is not None:
                found_ms = journal.now_ms()
                notification.update(state=str(VoucherState.READY), signedUrl=link)
                await self._publish(
                    channel,
                    Outgoing(
                        exchange=self.names.events,
                        routing_key=Route.READY,
                        body=orjson.dumps(notification),
                        message_id=f"{voucher_id}:{VoucherState.READY}",
                        correlation_id=voucher_id,
                        # The READY it makes is received just after the link was found.
                        headers=self._headers(row, found_ms + 1),
                    ),
                )
                await self._record(
                    row,
                    Step.READY_FOUND,
                    "no READY came, but Jackpot has a signed link: finishing it as READY",
                    state=State.READY,
                    at_ms=found_ms,
                )
                report.count("finished as READY")
                continue
            confirmed_for = datetime.now(UTC) - row["state_at"]
            if confirmed_for.total_seconds() >= self.settings.sweep_give_up_s:
                reason = give_up_reason(row, confirmed_for.total_seconds() / 3600)
                at_ms = journal.now_ms()
                await self._dead_letter(channel, row, notification, reason, Stage.PDFS)
                await self._record(row, Step.DEAD_LETTERED, reason, state=State.DEAD, at_ms=at_ms)
                report.count("gave up")
                continue
            checks = row["checks"] + 1
            await self.ledger.execute(
                "schedule_check",
                row["voucher_id"],
                datetime.now(UTC) + timedelta(seconds=self.settings.sweep_ready_after_s),
            )
            await self._record(
                row,
                Step.NOT_READY,
                f"Jackpot has no signed link yet (check {checks})",
                attempt=checks,
            )
            report.count("not ready yet")

    async def _unresolved_sales(self, channel: AbstractChannel, report: SweepReport) -> None:
        """Till sales whose reservation is unknown (or never tried) past the intake deadline:
        no RESERVED notification linked a voucher, so the till is told why not."""
        rows = await self.ledger.fetch(
            "requests_unresolved", self.settings.intake_deadline_s, SWEEP_BATCH
        )
        for row in rows:
            reason = (
                f"{unavailable_reason(row['amount_cents'])}: Jackpot never confirmed the "
                "reservation"
            )
            at_ms = journal.now_ms()
            update = DoshiiUpdate(
                location_id=row["location_id"],
                request_id=row["request_id"],
                voucher_id=None,
                coupon_id=None,
                status=DoshiiStatus.CANCELLED,
                cancelled_reason=reason,
            )
            await self._publish(channel, doshii_message(self.names, update, at_ms))
            await self.ledger.settle_request(row["request_id"], "cancelled", None, reason)
            await self.ledger.record(
                [
                    journal.step(
                        None,
                        f"{row['request_id']}:{STAGE}",
                        STAGE,
                        Step.CANCELLED,
                        request_id=row["request_id"],
                        at_ms=at_ms,
                        detail=reason,
                    )
                ]
            )
            report.count("sale cancelled")

    async def _expired(self, channel: AbstractChannel, report: SweepReport) -> None:
        for row in await self.ledger.fetch("reserved_past_expiry", SWEEP_BATCH):
            reason = (
                f"Gift card not issued: the reservation of voucher {row['coupon_id']} expired "
                "before it was confirmed"
            )
            update = DoshiiUpdate(
                location_id=row["location_id"],
                request_id=row["request_id"],
                voucher_id=row["voucher_id"],
                coupon_id=row["coupon_id"],
                status=DoshiiStatus.CANCELLED,
                reference=row["coupon_id"],
                cancelled_reason=reason,
            )
            # The step's time is before the effect's: the doshii stage's step comes after it.
            at_ms = journal.now_ms()
            await self._publish(channel, doshii_message(self.names, update, at_ms))
            await self._record(row, Step.EXPIRED, reason, state=State.EXPIRED, at_ms=at_ms)
            report.count("expired")

    async def _cancelled_after_payment(self, channel: AbstractChannel, report: SweepReport) -> None:
        rows = await self.ledger.fetch(
            "activated_to_audit",
            self.settings.sweep_audit_every_s,
            self.settings.sweep_audit_window_s,
            SWEEP_BATCH,
        )
        fine = []
        for row in rows:
            try:
                request = await self.deps.doshii.get(row["location_id"], row["request_id"])
            except (TransientError, PartnerRefused) as error:
                log.info(
                    "sweep_partner_unavailable", voucher_id=str(row["voucher_id"]), error=str(error)
                )
                report.count("partner unavailable")
                continue
            if request.get("status") != DoshiiStatus.CANCELLED:
                fine.append(row["voucher_id"])
                continue
            reason = refund_reason(row)
            notification = dict(row["notification"] or {})
            at_ms = journal.now_ms()
            await self._dead_letter(channel, row, notification, reason, None)
            await self._record(
                row, Step.REFUND_NEEDED, reason, state=State.REFUND_NEEDED, at_ms=at_ms
            )
            log.warning("refund_needed", voucher_id=str(row["voucher_id"]), reason=reason)
            report.count("refund needed")
        if fine:
            await self.ledger.execute("mark_audited", fine)

    async def _dead_letter(
        self,
        channel: AbstractChannel,
        row: Row,
        body: Mapping[str, Any],
        reason: str,
        replay_to: Stage | None,
    ) -> None:
        """A dead letter for an operator; `replay_to` is the stage `bridge dlq replay` feeds."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        # Not a work queue when nothing can be replayed: `dlq replay` leaves it alone.
        queue = self.names.queue(replay_to) if replay_to else f"{self.names.namespace}.{STAGE}"
        headers: dict[str, str | int] = {
            **self._headers(row),
            envelope.REASON: reason[:1000],
            envelope.STAGE: STAGE,
            envelope.QUEUE: queue,
            envelope.FIRST_FAILURE: now,
            envelope.LAST_FAILURE: now,
            envelope.ATTEMPT: row["checks"],
        }
        voucher_id = str(row["voucher_id"])
        await self._publish(
            channel,
            Outgoing(
                exchange=self.names.dead,
                routing_key=self.names.dead,
                body=orjson.dumps(dict(body)),
                message_id=f"{voucher_id}:{STAGE}",
                correlation_id=voucher_id,
                headers=headers,
            ),
        )

    async def _gauges(self) -> None:
        counts = await self.ledger.fetch("counts_by_state")
        for state in State:
            metrics.VOUCHERS_BY_STATE.labels(str(state)).set(0)
        for row in counts:
            metrics.VOUCHERS_BY_STATE.labels(row["state"]).set(row["count"])
        summary = await self.ledger.fetch("stuck_summary", self.settings.sweep_ready_after_s)
        stuck, oldest_s = summary[0]
        metrics.STUCK_VOUCHERS.set(stuck or 0)
        metrics.OLDEST_UNFINISHED_AGE.set(float(oldest_s or 0))
