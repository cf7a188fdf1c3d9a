"""A bounded load of plain vouchers through a running bridge, driven through the sandboxes' control
routes, and a check of how each one ended, read from the Doshii sandbox.

    python -m sandbox.load --vouchers 300 --rate 20 --ingress http://ingress:8080

It runs next to a `bridge sandbox` (in its container: the control routes answer loopback
clients only). For each voucher it opens a pending Doshii request, mints its notificationKey
with BRIDGE_KEY_SECRETS, reserves a Jackpot voucher with it and asks Jackpot to deliver it
(RESERVED, the bridge's confirm, READY; Jackpot retries each notification within its window).
Vouchers start at `--rate` per second, at most `--in-flight` at a time, so the load spans
whatever the caller breaks meanwhile. Then it waits (bounded) for every Doshii request to be
final and prints one JSON summary line on stdout: vouchers, activated once, lost (still pending
or not activated), activated twice, duplicate PUTs, the first problems, and every voucher id.
Exit status 0 only when every voucher was activated exactly once with its amount and coupon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp

from ingress.app import NOTIFICATION_PATH
from sandbox.control import CONTROL_PREFIX
from sandbox.doshii import Status
from sandbox.server import (
    DEFAULT_DOSHII_CLIENT_ID,
    DEFAULT_DOSHII_CLIENT_SECRET,
    DEFAULT_JACKPOT_API_KEY,
)
from shared.errors import SettingsError
from shared.keys import KeyRing
from shared.models import KeyClaims, value_to_cents
from shared.settings import load_settings

# Jackpot retries a notification for this long; it must outlast a broker or ingress restart.
RETRY_WINDOW_S = 300.0
# How long Jackpot waits for the bridge's confirm before giving up on a voucher.
CONFIRM_TIMEOUT_S = 300.0
FINAL_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 1.0
PROGRESS_INTERVAL_S = 5.0
# Values in currency units, cycled: every one a whole number of cents at any factor.
VALUES = tuple(Decimal(v) for v in (20, 25, 40, 50, 75, 110))
PROBLEMS_SHOWN = 10
ACCEPTED = 200


@dataclass(frozen=True)
class Voucher:
    """One voucher of the load: its Doshii request and its Jackpot voucher."""

    request_id: str
    voucher_id: str
    coupon_id: str
    amount_cents: int


@dataclass
class Tally:
    """What the load did and how it ended."""

    opened: list[Voucher] = field(default_factory=list)
    deliveries_failed: dict[str, str] = field(default_factory=dict)
    started_s: float = field(default_factory=time.monotonic)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _json(response: aiohttp.ClientResponse) -> Any:
    if response.status != ACCEPTED:
        raise RuntimeError(f"{response.method} {response.url.path}: HTTP {response.status}")
    return await response.json()


async def open_voucher(
    session: aiohttp.ClientSession,
    jackpot: str,
    doshii: str,
    keys: KeyRing,
    notification_url: str,
    value: Decimal,
    factor: int,
) -> Voucher:
    """A pending Doshii request (the till), its key, and a Jackpot voucher reserved with it."""
    cents = value_to_cents(value, factor)
    async with session.post(
        f"{doshii}{CONTROL_PREFIX}/requests", json={"amount_cents": cents}
    ) as r:
        request = await _json(r)
    claims = KeyClaims(
        location_id=request["locationId"], request_id=request["id"], amount_cents=cents
    )
    body = {
        "notification_url": notification_url,
        "notification_key": keys.mint(claims),
        "value": str(value),
    }
    async with session.post(f"{jackpot}{CONTROL_PREFIX}/reservations", json=body) as r:
        voucher = await _json(r)
    return Voucher(request["id"], voucher["id"], voucher["couponId"], cents)


async def deliver(
    session: aiohttp.ClientSession, jackpot: str, voucher: Voucher, retry_window_s: float
) -> str | None:
    """Jackpot plays RESERVED, waits for the confirm, then READY; None if both were taken."""
    body = {"confirm_timeout_s": CONFIRM_TIMEOUT_S, "retry_window_s": retry_window_s}
    url = f"{jackpot}{CONTROL_PREFIX}/vouchers/{voucher.voucher_id}/deliver"
    async with session.post(url, json=body) as r:
        outcome = await _json(r)
    if outcome["ready_status"] != ACCEPTED:
        return (
            f"RESERVED {outcome['reserved_status']}, READY {outcome['ready_status']}, "
            f"voucher {outcome['state']}"
        )
    return None


async def record(session: aiohttp.ClientSession, doshii: str, request_id: str) -> dict[str, Any]:
    """The Doshii sandbox's record of a request, with every PUT and log entry."""
    async with session.get(f"{doshii}{CONTROL_PREFIX}/requests/{request_id}") as r:
        found: dict[str, Any] = await _json(r)
    return found


async def wait_final(
    session: aiohttp.ClientSession, doshii: str, vouchers: Sequence[Voucher], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Poll until every request is activated or cancelled, or `timeout_s` has passed."""
    records: dict[str, dict[str, Any]] = {}
    pending = list(vouchers)
    deadline = time.monotonic() + timeout_s
    final = (Status.ACTIVATED.value, Status.CANCELLED.value)
    while pending:
        fetched = await asyncio.gather(*(record(session, doshii, v.request_id) for v in pending))
        for voucher, found in zip(pending, fetched, strict=True):
            records[voucher.request_id] = found
        pending = [v for v in pending if records[v.request_id]["status"] not in final]
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_INTERVAL_S)
    return records


def problems_of(voucher: Voucher, found: dict[str, Any]) -> list[str]:
    """How a voucher's Doshii request differs from activated once, with its amount and coupon."""
    problems = []
    activations = [e for e in found["logs"] if e.get("status") == Status.ACTIVATED.value]
    if found["status"] != Status.ACTIVATED.value:
        problems.append(f"status {found['status']}, not activated")
    if len(activations) > 1:
        problems.append(f"activated {len(activations)} times")
    if found.get("amount") != str(voucher.amount_cents):
        problems.append(f"amount {found.get('amount')}, not {voucher.amount_cents}")
    if found["status"] == Status.ACTIVATED.value and found.get("reference") != voucher.coupon_id:
        problems.append(f"reference {found.get('reference')}, not coupon {voucher.coupon_id}")
    return problems


async def run_load(args: argparse.Namespace, keys: KeyRing, factor: int) -> dict[str, Any]:
    """Start the vouchers at the rate asked, wait for every one to be final, tally them."""
    tally = Tally()
    notification_url = f"{args.ingress.rstrip('/')}{NOTIFICATION_PATH}"
    gate = asyncio.Semaphore(args.in_flight)
    # No total timeout: a delivery lasts as long as Jackpot's retries and the confirm wait.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(index: int) -> None:
            try:
                value = VALUES[index % len(VALUES)]
                voucher = await open_voucher(
                    session, args.jackpot, args.doshii, keys, notification_url, value, factor
                )
                tally.opened.append(voucher)
                failure = await deliver(session, args.jackpot, voucher, args.retry_window_s)
                if failure is not None:
                    tally.deliveries_failed[voucher.request_id] = failure
            except (aiohttp.ClientError, RuntimeError, KeyError) as error:
                tally.deliveries_failed[f"#{index}"] = f"{type(error).__name__}: {error}"
            finally:
                gate.release()

        tasks = []
        for index in range(args.vouchers):
            await gate.acquire()
            tasks.append(asyncio.create_task(one(index)))
            if index and index % (args.rate * PROGRESS_INTERVAL_S) == 0:
                _stderr(f"load: {index} vouchers started")
            await asyncio.sleep(1.0 / args.rate)
        await asyncio.gather(*tasks)
        delivered_s = time.monotonic() - tally.started_s
        _stderr(f"load: {len(tally.opened)} vouchers delivered in {delivered_s:.1f} s")
        records = await wait_final(session, args.doshii, tally.opened, args.final_timeout_s)
    return summarise(tally, records, delivered_s)


def summarise(
    tally: Tally, records: dict[str, dict[str, Any]], delivered_s: float
) -> dict[str, Any]:
    """The JSON summary: counts, and the first problems named by Doshii request."""
    problems: list[str] = []
    activated_once = twice = duplicate_puts = 0
    for voucher in tally.opened:
        found = records[voucher.request_id]
        mine = problems_of(voucher, found)
        activations = sum(e.get("status") == Status.ACTIVATED.value for e in found["logs"])
        activated_once += not mine
        twice += activations > 1
        duplicate_puts += max(0, len(found["puts"]) - 1)
        problems.extend(f"request {voucher.request_id}: {p}" for p in mine)
    problems.extend(f"{key}: {why}" for key, why in tally.deliveries_failed.items())
    lost = sum(
        records[v.request_id]["status"] != Status.ACTIVATED.value for v in tally.opened
    ) + sum(key.startswith("#") for key in tally.deliveries_failed)
    return {
        "vouchers": len(tally.opened) + sum(k.startswith("#") for k in tally.deliveries_failed),
        "activated_once": activated_once,
        "lost": lost,
        "activated_twice": twice,
        "duplicate_puts": duplicate_puts,
        "deliveries_failed": len(tally.deliveries_failed),
        "delivered_s": round(delivered_s, 1),
        "final_s": round(time.monotonic() - tally.started_s, 1),
        "problems": problems[:PROBLEMS_SHOWN],
        "ok": not problems,
        # So a caller can look the load's vouchers up elsewhere (the ledger, `bridge status`).
        "voucher_ids": [v.voucher_id for v in tally.opened],
    }


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m sandbox.load`."""
    cli = argparse.ArgumentParser(prog="python -m sandbox.load", description=__doc__.split("\n")[0])
    cli.add_argument("--vouchers", type=int, default=300, help="how many (default 300)")
    cli.add_argument("--rate", type=int, default=20, help="vouchers started per second")
    cli.add_argument("--in-flight", type=int, default=64, help="vouchers being delivered at once")
    cli.add_argument("--ingress", default="http://ingress:8080", help="the bridge's ingress")
    cli.add_argument("--jackpot", default="http://127.0.0.1:8091", help="the Jackpot sandbox")
    cli.add_argument("--doshii", default="http://127.0.0.1:8092", help="the Doshii sandbox")
    cli.add_argument(
        "--retry-window-s",
        type=float,
        default=RETRY_WINDOW_S,
        help="how long Jackpot retries each notification",
    )
    cli.add_argument(
        "--final-timeout-s",
        type=float,
        default=FINAL_TIMEOUT_S,
        help="how long to wait for every Doshii request to be final once all are delivered",
    )
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load; print its JSON summary; 0 when every voucher was activated exactly once."""
    args = parser().parse_args(argv)
    if args.vouchers < 1 or args.rate < 1 or args.in_flight < 1:
        print("sandbox.load: --vouchers, --rate and --in-flight must be 1 or more", file=sys.stderr)
        return 2
    try:
        # Only BRIDGE_KEY_SECRETS and BRIDGE_VALUE_TO_CENTS matter here; the partner
        # credentials the settings require are the sandbox's own.
        settings = load_settings(
            jackpot_api_key=DEFAULT_JACKPOT_API_KEY,
            doshii_client_id=DEFAULT_DOSHII_CLIENT_ID,
            doshii_client_secret=DEFAULT_DOSHII_CLIENT_SECRET,
        )
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    summary = asyncio.run(run_load(args, KeyRing(settings.key_secrets), settings.value_to_cents))
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
