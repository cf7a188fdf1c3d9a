"""`bridge status` and `bridge vouchers`: the ledger, read by an operator."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from shared.journal import FINISHED, State
from shared.ledger import Ledger
from shared.settings import Settings

# A ledger row: asyncpg's Record, or a plain mapping in tests.
Row = Mapping[str, Any] | asyncpg.Record

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Columns of `bridge vouchers`, in order.
COLUMNS = ("voucher_id", "coupon_id", "request_id", "amount_cents", "state", "last_change")


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `2h`, `7d`."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 2h or 7d")
    return timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])


def advice(row: Row, stuck_after_s: float, now: datetime) -> str | None:
    """What an operator should do about a voucher, or None when nothing is needed."""
    state = row["state"]
    if state == State.DEAD:
        return (
            "dead-lettered: read the reason in `bridge dlq list`, fix it, then `bridge dlq replay`"
        )
    if state == State.REFUND_NEEDED:
        return "the voucher is paid but the card was cancelled at the till: refund it by hand"
    if state in FINISHED:
        return None
    idle_s = (now - row["last_change"]).total_seconds()
    if idle_s < stuck_after_s:
        return None
    waiting = {
        State.RESERVED: "the reservations stage has not confirmed it: look for retries in its "
        "queue and the delay tiers",
        State.CONFIRMED: "Jackpot has not sent READY: the sweeper asks Jackpot for the link",
        State.READY: "the pdfs stage has not stored the PDF: look at its queue and retries",
        State.PDF_STORED: "Doshii has not activated the card: look for retries in the pdfs queue "
        "and the delay tiers",
    }.get(state, "nothing has moved it: look at the stage queues and `bridge dlq list`")
    return f"no change for {int(idle_s // 60)} min: {waiting}"


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool | dict | list):
        return value
    return str(value)


def as_json(row: Row) -> dict[str, Any]:
    return {key: _plain(value) for key, value in row.items() if key != "notification"}


def timeline(row: Row, journey: Sequence[Row], stuck_after_s: float, now: datetime) -> str:
    """A voucher's state and journey, as a person reads it."""
    amount = row["amount_cents"]
    lines = [
        f"voucher {row['voucher_id']}  coupon {row['coupon_id'] or '?'}",
        f"  Doshii location {row['location_id'] or '?'}, request {row['request_id'] or '?'}, "
        f"amount {'?' if amount is None else f'{amount / 100:.2f}'}",
        f"  state: {row['state']} since {row['state_at']:%Y-%m-%d %H:%M:%S} UTC"
        f"  (first seen {row['first_seen']:%Y-%m-%d %H:%M:%S}, last change "
        f"{row['last_change']:%H:%M:%S})",
    ]
    if row["pdf_path"]:
        lines.append(f"  PDF: {row['pdf_path']} ({row['pdf_bytes']} bytes)")
    if row["doshii_status"]:
        lines.append(f"  Doshii: {row['doshii_status']}")
    lines.append("  journey:")
    lines += [_step_line(step) for step in journey]
    todo = advice(row, stuck_after_s, now)
    if todo:
        lines.append(f"  to do: {todo}")
    return "\n".join(lines)


def request_timeline(request: Row, journey: Sequence[Row]) -> str:
    """A till's request that no voucher pays for: its state, reason and steps."""
    lines = [
        f"Doshii request {request['request_id']}  location {request['location_id']}  "
        f"amount {request['amount_cents'] / 100:.2f}",
        f"  state: {request['state']}" + (f" ({request['reason']})" if request["reason"] else ""),
        "  journey:",
    ]
    lines += [_step_line(step) for step in journey]
    if request["state"] == "unknown":
        lines.append(
            "  to do: nothing yet: Jackpot's RESERVED notification links the voucher, or the "
            "sweeper cancels the sale after BRIDGE_INTAKE_DEADLINE_S"
        )
    return "\n".join(lines)


def _step_line(step: Row) -> str:
    attempt = f" (attempt {step['attempt'] + 1})" if step["attempt"] else ""
    said = step["outcome"] + attempt
    if step["detail"]:
        # A detail that starts with the outcome says it already ("PDF stored: path").
        detail = step["detail"]
        said = detail if detail.startswith(step["outcome"]) else f"{said}: {detail}"
    return f"    {step['at']:%H:%M:%S.%f}"[:-3] + f"  {step['stage']:<12} {said}"


async def status(settings: Settings, ident: str, *, as_json_lines: bool = False) -> int:
    """`bridge status ID`: 0 when found, 1 when the ledger knows no such voucher."""
    now = datetime.now(UTC)
    async with Ledger.open(settings, max_size=1) as ledger:
        rows = await ledger.find(ident)
        if not rows:
            requests = await ledger.fetch("find_request", ident)
            if not requests:
                print(f"the ledger knows no voucher, coupon or Doshii request {ident!r}")
                return 1
            # A sale no voucher pays for (yet): the request's own story.
            journey = await ledger.fetch("request_journey", ident)
            if as_json_lines:
                print(json.dumps(as_json(requests[0]) | {"journey": [as_json(s) for s in journey]}))
            else:
                print(request_timeline(requests[0], journey))
            return 0
        for row in rows:
            journey = await ledger.journey(row["voucher_id"], row["request_id"])
            if as_json_lines:
                record = as_json(row) | {"journey": [as_json(s) for s in journey]}
                record["advice"] = advice(row, settings.sweep_ready_after_s, now)
                print(json.dumps(record))
            else:
                print(timeline(row, journey, settings.sweep_ready_after_s, now))
    return 0


def table(rows: Sequence[Row]) -> str:
    if not rows:
        return "no vouchers"
    cells = [[_cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return "" if value is None else str(value)


async def vouchers(
    settings: Settings,
    *,
    state: str | None,
    stuck: bool,
    since: timedelta | None,
    json_lines: bool,
    limit: int,
) -> int:
    """`bridge vouchers`: a table, or JSON lines."""
    changed_since = datetime.now(UTC) - since if since is not None else None
    async with Ledger.open(settings, max_size=1) as ledger:
        rows = await ledger.fetch(
            "list_vouchers", state, stuck, changed_since, settings.sweep_ready_after_s, limit
        )
    if json_lines:
        for row in rows:
            print(json.dumps(as_json(row)))
    else:
        print(table(rows))
    return 0
