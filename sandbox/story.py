"""The demo's story: open a voucher for every case, play Jackpot's side of each, check how it ended.

A story needs the sandboxes (in this process) and a bridge's ingress (anywhere). For every CASE
it opens a ticket: a pending Doshii activation request (the POS), its notificationKey minted
with the bridge's key secrets, and a Jackpot voucher reserved with that key. It then plays every
ticket concurrently, waits (bounded) until every Doshii request is final and checks each one
against what its case expects. `play_story` returns the rows and the verdict; how they are shown
is the caller's:

- `python -m sandbox.demo` prints them as a table (sandboxes and `bridge run` on loopback);
- `bridge sandbox --story INGRESS_URL` (`tell_stories`) waits for the ingress's /readyz, then
  logs one line per voucher and a summary with the verdict, once or every `--story-repeat-s`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog

from ingress.app import NOTIFICATION_PATH
from sandbox.doshii import DoshiiSandbox, Status
from sandbox.faults import Fault, FaultRoute
from sandbox.jackpot import JackpotSandbox, State
from sandbox.server import Sandboxes
from shared.keys import KeyRing
from shared.models import KeyClaims, value_to_cents
from shared.settings import Settings
from workers.pdfs import PDF_MAGIC

DOSHII_FAULT_STATUS = 503
DOSHII_FAULT_TIMES = 2
CENTS_PER_UNIT = 100
FINAL_STATUSES = (Status.ACTIVATED.value, Status.CANCELLED.value)

# `bridge sandbox --story`: the bridge's containers start in any order, so a story waits long
# for the ingress, for its notifications to be taken and for every voucher to be final.
READY_TIMEOUT_S = 120.0
READY_POLL_S = 1.0
READY_LOG_EVERY_S = 10.0
PROBE_TIMEOUT_S = 2.0
STORY_DEADLINE_S = 300.0
STORY_RETRY_WINDOW_S = 300.0
STORY_PROGRESS_INTERVAL_S = 5.0
OK_VERDICT = "OK"
FAILED_VERDICT = "FAILED"

log = structlog.get_logger("story")


class StoryError(Exception):
    """Jackpot's side of a voucher could not be played; the message says why."""


class Kind(StrEnum):
    """What happens to a voucher on its way; the value is the table's `case` column."""

    PLAIN = "plain"
    EXPIRED_LINK = "expired link"
    CANCELLED = "cancelled at Jackpot"
    DOSHII_503 = f"Doshii {DOSHII_FAULT_STATUS} x{DOSHII_FAULT_TIMES}"


@dataclass(frozen=True)
class Case:
    """One voucher to play: its kind and its Jackpot value (in currency units)."""

    kind: Kind
    value: Decimal


CASES = (
    Case(Kind.PLAIN, Decimal(25)),
    Case(Kind.PLAIN, Decimal(50)),
    Case(Kind.PLAIN, Decimal(110)),
    Case(Kind.PLAIN, Decimal("37.50")),
    Case(Kind.EXPIRED_LINK, Decimal(40)),
    Case(Kind.CANCELLED, Decimal(60)),
    Case(Kind.DOSHII_503, Decimal(150)),
)


@dataclass(frozen=True)
class Ticket:
    """A case in flight: the Doshii request it pays for and the Jackpot voucher reserved for it."""

    case: Case
    request_id: str
    location_id: str
    voucher_id: str
    coupon_id: str
    amount_cents: int

    @property
    def expected_status(self) -> str:
        """The Doshii status the case must end in: cancelled, or else activated."""
        cancelled = self.case.kind is Kind.CANCELLED
        return Status.CANCELLED.value if cancelled else Status.ACTIVATED.value


@dataclass(frozen=True)
class Row:
    """How one voucher ended, checked against what was expected."""

    ticket: Ticket
    status: str
    amount: str
    retries: str
    pdf_path: Path | None
    pdf_bytes: int | None
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Timing:
    """How long a story waits: for every voucher to be final, and for the ingress to take a
    notification (Jackpot re-sends it that long); and how often it reports progress."""

    deadline_s: float
    retry_window_s: float
    progress_interval_s: float


STORY_TIMING = Timing(STORY_DEADLINE_S, STORY_RETRY_WINDOW_S, STORY_PROGRESS_INTERVAL_S)


class Observer(Protocol):
    """Who is told how a story goes while it runs (stderr for the demo, the log for `--story`)."""

    def started(self, vouchers: int, deadline_s: float) -> None:
        """Every ticket is open; delivery starts now."""

    def progress(self, finished: int, vouchers: int, elapsed_s: float) -> None:
        """Every `progress_interval_s`: how many Doshii requests are final so far."""

    def stuck(self, ticket: Ticket, why: str) -> None:
        """A ticket still pending at the deadline, and where it stopped."""

    def delivered(self, finished: int, vouchers: int, elapsed_s: float) -> None:
        """Delivery is over (every request final, or the deadline passed)."""


@dataclass(frozen=True)
class Outcome:
    """A played story: one row per case, in CASES order, and how long it took."""

    rows: tuple[Row, ...]
    runtime_s: float

    @property
    def problems(self) -> list[str]:
        """Every difference from the expectation, each naming its Doshii request."""
        return [f"request {r.ticket.request_id}: {p}" for r in self.rows for p in r.problems]

    @property
    def verdict(self) -> str:
        """OK when every voucher ended as expected, FAILED otherwise."""
        return FAILED_VERDICT if self.problems else OK_VERDICT


# Opening and playing


def open_ticket(
    sandboxes: Sandboxes, keys: KeyRing, settings: Settings, notification_url: str, case: Case
) -> Ticket:
    """A pending Doshii request (the POS), its key, and a Jackpot voucher reserved with it."""
    cents = value_to_cents(case.value, settings.value_to_cents)
    request_id = sandboxes.doshii.create_request(amount_cents=cents)
    location_id = sandboxes.doshii.locations[request_id]
    claims = KeyClaims(location_id=location_id, request_id=request_id, amount_cents=cents)
    voucher = sandboxes.jackpot.reserve(
        notification_url=notification_url, notification_key=keys.mint(claims), value=case.value
    )
    return Ticket(case, request_id, location_id, voucher["id"], voucher["couponId"], cents)


def open_tickets(sandboxes: Sandboxes, settings: Settings, ingress_url: str) -> list[Ticket]:
    """One ticket per case, every key minted with the bridge's (first) secret."""
    keys = KeyRing(settings.key_secrets)
    url = f"{ingress_url.rstrip('/')}{NOTIFICATION_PATH}"
    return [open_ticket(sandboxes, keys, settings, url, case) for case in CASES]


async def wait_final(doshii: DoshiiSandbox, tickets: Sequence[Ticket], timeout_s: float) -> None:
    """Wait until every ticket's Doshii request is activated or cancelled."""
    await asyncio.gather(
        *(
            doshii.wait_for_status(t.request_id, *FINAL_STATUSES, timeout_s=timeout_s)
            for t in tickets
        )
    )


async def cancel_after_confirm(jackpot: JackpotSandbox, voucher_id: str, timing: Timing) -> None:
    """RESERVED, wait for the bridge's confirm, then CANCELED at Jackpot and notified."""
    window_s = timing.retry_window_s
    status = await jackpot.notify(voucher_id, State.RESERVED, retry_window_s=window_s)
    if status != 200:
        raise StoryError(f"the ingress answered RESERVED with {status}")
    await jackpot.wait_for_state(voucher_id, State.CONFIRMED, timeout_s=timing.deadline_s)
    jackpot.set_state(voucher_id, State.CANCELED)
    status = await jackpot.notify(voucher_id, retry_window_s=window_s)
    if status != 200:
        raise StoryError(f"the ingress answered CANCELED with {status}")


async def play(
    ticket: Ticket, sandboxes: Sandboxes, tickets: Sequence[Ticket], timing: Timing
) -> None:
    """Jackpot's side of one voucher's life, as its case wants it."""
    kind = ticket.case.kind
    if kind is Kind.CANCELLED:
        await cancel_after_confirm(sandboxes.jackpot, ticket.voucher_id, timing)
        return
    if kind is Kind.DOSHII_503:
        # Faults are per route, not per request: wait until the others are done with Doshii.
        others = [t for t in tickets if t is not ticket]
        await wait_final(sandboxes.doshii, others, timing.deadline_s)
        fault = Fault(status=DOSHII_FAULT_STATUS, times=DOSHII_FAULT_TIMES)
        sandboxes.faults.set(FaultRoute.DOSHII_PUT, fault)
    outcome = await sandboxes.jackpot.deliver(
        ticket.voucher_id,
        expired_link=kind is Kind.EXPIRED_LINK,
        retry_window_s=timing.retry_window_s,
        confirm_timeout_s=timing.deadline_s,
    )
    if outcome.ready_status != 200:
        raise StoryError(
            f"notifications not taken: RESERVED {outcome.reserved_status}, "
            f"READY {outcome.ready_status}, voucher {outcome.state}"
        )


def finished(doshii: DoshiiSandbox, tickets: Sequence[Ticket]) -> int:
    """How many tickets' Doshii requests are no longer pending."""
    pending = Status.PENDING.value
    return sum(doshii.requests[t.request_id]["status"] != pending for t in tickets)


async def show_progress(
    doshii: DoshiiSandbox, tickets: Sequence[Ticket], timing: Timing, observer: Observer
) -> None:
    """Tell the observer every `progress_interval_s` how many vouchers are final."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(timing.progress_interval_s)
        elapsed_s = time.monotonic() - started
        observer.progress(finished(doshii, tickets), len(tickets), elapsed_s)


async def deliver_all(
    sandboxes: Sandboxes, tickets: Sequence[Ticket], timing: Timing, observer: Observer
) -> dict[str, str]:
    """Play every ticket concurrently and wait until all are final, within the deadline.

    Returns why a ticket's play failed, by Doshii request id; on timeout, the stuck ones.
    """
    plays = [asyncio.create_task(play(t, sandboxes, tickets, timing)) for t in tickets]
    progress = asyncio.create_task(show_progress(sandboxes.doshii, tickets, timing, observer))
    failures: dict[str, str] = {}
    try:
        async with asyncio.timeout(timing.deadline_s):
            results = await asyncio.gather(*plays, return_exceptions=True)
            for ticket, result in zip(tickets, results, strict=True):
                if isinstance(result, BaseException):
                    failures[ticket.request_id] = f"{type(result).__name__}: {result}"
            playing = [t for t in tickets if t.request_id not in failures]
            await wait_final(sandboxes.doshii, playing, timing.deadline_s)
    except TimeoutError:
        for request_id, why in stuck(sandboxes, tickets, timing, observer).items():
            earlier = failures.get(request_id)
            failures[request_id] = why if earlier is None else f"{earlier}; {why}"
    finally:
        for task in (*plays, progress):
            task.cancel()
        await asyncio.gather(*plays, progress, return_exceptions=True)
    return failures


def stuck(
    sandboxes: Sandboxes, tickets: Sequence[Ticket], timing: Timing, observer: Observer
) -> dict[str, str]:
    """Every ticket still pending at the deadline, with where it stopped; also to the observer."""
    found: dict[str, str] = {}
    for ticket in tickets:
        if sandboxes.doshii.requests[ticket.request_id]["status"] != Status.PENDING:
            continue
        jackpot_state = sandboxes.jackpot.vouchers[ticket.voucher_id]["state"]
        answers = [
            d.status for d in sandboxes.jackpot.deliveries if d.voucher_id == ticket.voucher_id
        ]
        found[ticket.request_id] = (
            f"stuck after {timing.deadline_s:.0f} s: Doshii pending, Jackpot {jackpot_state}, "
            f"ingress answers {answers}"
        )
        observer.stuck(ticket, found[ticket.request_id])
    return found


# Checking


def money(cents: object) -> str:
    """`11000` (cents, as int or digits) as `110.00`; `-` when there is none."""
    try:
        return f"{Decimal(str(cents)) / CENTS_PER_UNIT:.2f}"
    except ArithmeticError:
        return "-"


def retries(ticket: Ticket, sandboxes: Sandboxes) -> str:
    """What had to be tried again: refused Doshii PUTs, renewed links, re-sent notifications."""
    puts = sandboxes.doshii.puts.get(ticket.request_id, [])
    refused = collections.Counter(p["status"] for p in puts if p["status"] != 200)
    parts = [f"Doshii PUT {status or 'dropped'} x{n}" for status, n in sorted(refused.items())]
    renewed = sandboxes.jackpot.signedurl_calls[ticket.voucher_id]
    if renewed:
        parts.append(f"link renewed x{renewed}")
    resent = sum(
        d.voucher_id == ticket.voucher_id and d.status != 200 for d in sandboxes.jackpot.deliveries
    )
    if resent:
        parts.append(f"notification re-sent x{resent}")
    return ", ".join(parts) or "-"


def accepted_update(ticket: Ticket, doshii: DoshiiSandbox) -> dict[str, Any]:
    """The body of the last PUT Doshii accepted for the ticket's request (empty if none)."""
    bodies = [p["body"] for p in doshii.puts.get(ticket.request_id, []) if p["status"] == 200]
    last = bodies[-1] if bodies else {}
    return last if isinstance(last, dict) else {}


def pdf_problems(
    ticket: Ticket, sandboxes: Sandboxes, pdf_dir: Path | None, pdf: bytes | None
) -> list[str]:
    """What is wrong with the PDF of an activated voucher.

    With the bridge's PDF folder at hand, the stored file must be Jackpot's PDF; without it
    (the bridge runs elsewhere), Jackpot must at least have served the PDF once.
    """
    if pdf_dir is None:
        if not sandboxes.jackpot.pdf_downloads[ticket.voucher_id]:
            return ["the PDF was never downloaded from Jackpot"]
        return []
    if pdf is None:
        return ["no PDF stored"]
    if not pdf.startswith(PDF_MAGIC):
        return ["the stored file does not start with %PDF-"]
    if pdf != sandboxes.jackpot.pdf(ticket.voucher_id):
        return ["the stored PDF differs from Jackpot's"]
    return []


def activation_problems(
    ticket: Ticket, sandboxes: Sandboxes, pdf_dir: Path | None, pdf: bytes | None
) -> list[str]:
    """What differs from: activated with the voucher's amount, reference = couponId, PDF kept."""
    problems = pdf_problems(ticket, sandboxes, pdf_dir, pdf)
    update = accepted_update(ticket, sandboxes.doshii)
    if str(update.get("amount")) != str(ticket.amount_cents):
        problems.append(f"activated with amount {update.get('amount')}, not {ticket.amount_cents}")
    reference = sandboxes.doshii.requests[ticket.request_id].get("reference")
    if reference != ticket.coupon_id:
        problems.append(f"reference is {reference!r}, not the couponId {ticket.coupon_id}")
    kind = ticket.case.kind
    if kind is Kind.EXPIRED_LINK and not sandboxes.jackpot.signedurl_calls[ticket.voucher_id]:
        problems.append("the expired link was never renewed")
    refused = [p for p in sandboxes.doshii.puts.get(ticket.request_id, []) if p["status"] != 200]
    if kind is Kind.DOSHII_503 and not refused:
        problems.append("the injected 503s never reached this request")
    return problems


def cancellation_problems(ticket: Ticket, sandboxes: Sandboxes, pdf: bytes | None) -> list[str]:
    """What differs from: cancelled at Jackpot, no PDF kept."""
    problems = [] if pdf is None else ["a PDF was stored for a cancelled voucher"]
    state = sandboxes.jackpot.vouchers[ticket.voucher_id]["state"]
    if state != State.CANCELED:
        problems.append(f"the Jackpot voucher is {state}, not CANCELED")
    return problems


def check(ticket: Ticket, sandboxes: Sandboxes, pdf_dir: Path | None, failure: str | None) -> Row:
    """Read how the ticket ended at Doshii (and on disk, given `pdf_dir`), and what differs."""
    status = str(sandboxes.doshii.requests[ticket.request_id]["status"])
    path = pdf_dir / f"{ticket.voucher_id}.pdf" if pdf_dir is not None else None
    pdf = path.read_bytes() if path is not None and path.is_file() else None
    problems = [] if failure is None else [failure]
    if status != ticket.expected_status:
        problems.append(f"Doshii says {status}, expected {ticket.expected_status}")
    elif ticket.expected_status == Status.ACTIVATED:
        problems += activation_problems(ticket, sandboxes, pdf_dir, pdf)
    else:
        problems += cancellation_problems(ticket, sandboxes, pdf)
    amount = accepted_update(ticket, sandboxes.doshii).get("amount")
    return Row(
        ticket=ticket,
        status=status,
        amount=money(amount),
        retries=retries(ticket, sandboxes),
        pdf_path=path if pdf is not None else None,
        pdf_bytes=len(pdf) if pdf is not None else None,
        problems=tuple(problems),
    )


def expected(ticket: Ticket) -> str:
    """What the ticket should end as: `activated 25.00` or `cancelled`."""
    status = ticket.expected_status
    if status == Status.ACTIVATED:
        return f"{status} {money(ticket.amount_cents)}"
    return status


async def play_story(
    sandboxes: Sandboxes,
    settings: Settings,
    ingress_url: str,
    *,
    timing: Timing,
    observer: Observer,
    pdf_dir: Path | None = None,
) -> Outcome:
    """Open a ticket per case, play them all against the ingress, wait, and check every one.

    Keys are minted with `settings.key_secrets` and amounts converted with
    `settings.value_to_cents`: both must be the bridge's. `pdf_dir` is the bridge's PDF folder
    when this process can read it (the demo); without it, PDFs are checked at Jackpot's side.
    """
    started = time.monotonic()
    tickets = open_tickets(sandboxes, settings, ingress_url)
    observer.started(len(tickets), timing.deadline_s)
    delivering = time.monotonic()
    failures = await deliver_all(sandboxes, tickets, timing, observer)
    done = finished(sandboxes.doshii, tickets)
    observer.delivered(done, len(tickets), time.monotonic() - delivering)
    rows = tuple(check(t, sandboxes, pdf_dir, failures.get(t.request_id)) for t in tickets)
    return Outcome(rows, time.monotonic() - started)


# `bridge sandbox --story`


class LogObserver:
    """Tells a story's progress in structlog lines, every one carrying the story's number."""

    def __init__(self, number: int) -> None:
        self.number = number

    def started(self, vouchers: int, deadline_s: float) -> None:
        """Log that delivery starts."""
        log.info("story delivering", story=self.number, vouchers=vouchers, deadline_s=deadline_s)

    def progress(self, finished: int, vouchers: int, elapsed_s: float) -> None:
        """Log how many vouchers are final so far."""
        log.info(
            "story progress",
            story=self.number,
            finished=finished,
            vouchers=vouchers,
            elapsed_s=round(elapsed_s, 1),
        )

    def stuck(self, ticket: Ticket, why: str) -> None:
        """Log a voucher still pending at the deadline."""
        log.warning(
            "story stuck",
            story=self.number,
            case=str(ticket.case.kind),
            doshii_request_id=ticket.request_id,
            voucher_id=ticket.voucher_id,
            why=why,
        )

    def delivered(self, finished: int, vouchers: int, elapsed_s: float) -> None:
        """Log that delivery is over."""
        log.info(
            "story delivered",
            story=self.number,
            finished=finished,
            vouchers=vouchers,
            elapsed_s=round(elapsed_s, 1),
        )


def log_outcome(number: int, outcome: Outcome) -> None:
    """The table as log lines: one per voucher, then the summary with the verdict."""
    for row in outcome.rows:
        ticket = row.ticket
        log.info(
            "story voucher",
            story=number,
            case=str(ticket.case.kind),
            doshii_request_id=ticket.request_id,
            coupon_id=ticket.coupon_id,
            voucher_id=ticket.voucher_id,
            status=row.status,
            amount=row.amount,
            expected=expected(ticket),
            retries=row.retries,
            ok=not row.problems,
            problems=list(row.problems),
        )
    statuses = collections.Counter(row.status for row in outcome.rows)
    summary = log.info if outcome.verdict == OK_VERDICT else log.error
    summary(
        "story finished",
        story=number,
        verdict=outcome.verdict,
        vouchers=len(outcome.rows),
        ok=sum(not row.problems for row in outcome.rows),
        activated=statuses[Status.ACTIVATED.value],
        cancelled=statuses[Status.CANCELLED.value],
        runtime_s=round(outcome.runtime_s, 1),
        problems=outcome.problems,
    )


async def probe(session: aiohttp.ClientSession, url: str) -> str | None:
    """None when `GET url` answers 200; otherwise what it answered, or why it did not."""
    try:
        async with session.get(url) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError) as error:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def wait_for_ingress(
    ingress_url: str,
    *,
    timeout_s: float = READY_TIMEOUT_S,
    poll_s: float = READY_POLL_S,
    log_every_s: float = READY_LOG_EVERY_S,
) -> bool:
    """Poll `ingress_url/readyz` every `poll_s` until it answers 200 (True) or `timeout_s` has
    passed (False); logs what it last answered on the first miss and every `log_every_s`."""
    url = f"{ingress_url.rstrip('/')}/readyz"
    loop = asyncio.get_running_loop()
    started = loop.time()
    logged_at: float | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as s:
        while True:
            answer = await probe(s, url)
            waited_s = loop.time() - started
            if answer is None:
                if logged_at is not None:
                    log.info("story ingress ready", url=url, waited_s=round(waited_s, 1))
                return True
            if waited_s >= timeout_s:
                log.error(
                    "story ingress not ready",
                    url=url,
                    waited_s=round(waited_s, 1),
                    answer=answer,
                )
                return False
            if logged_at is None or loop.time() - logged_at >= log_every_s:
                logged_at = loop.time()
                log.info(
                    "story waiting for the ingress",
                    url=url,
                    waited_s=round(waited_s, 1),
                    timeout_s=timeout_s,
                    answer=answer,
                )
            await asyncio.sleep(poll_s)


async def tell_story(
    number: int,
    sandboxes: Sandboxes,
    settings: Settings,
    ingress_url: str,
    *,
    timing: Timing = STORY_TIMING,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Outcome | None:
    """Wait for the ingress, play one story and log it; None when the ingress was not ready.

    Every line logged meanwhile carries `story=number`, the waiting for the ingress included.
    """
    with structlog.contextvars.bound_contextvars(story=number):
        if not await wait_for_ingress(ingress_url, timeout_s=ready_timeout_s):
            log.error("story skipped", reason="the ingress is not ready")
            return None
        log.info("story started", ingress_url=ingress_url, vouchers=len(CASES))
        outcome = await play_story(
            sandboxes, settings, ingress_url, timing=timing, observer=LogObserver(number)
        )
        log_outcome(number, outcome)
        return outcome


async def tell_stories(
    sandboxes: Sandboxes,
    settings: Settings,
    ingress_url: str,
    *,
    repeat_s: float = 0.0,
    timing: Timing = STORY_TIMING,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Tell a story once (`repeat_s` 0), or a fresh one every `repeat_s` until cancelled.

    `repeat_s` runs from the start of one story to the next, the wait for the ingress left
    out: a story that found no ready ingress is followed by another wait at once. Stories never
    overlap (the Doshii fault is per route): one that takes longer than `repeat_s` is followed
    by the next at once. A story that breaks is logged, not fatal: the sandboxes keep serving
    the bridge either way.
    """
    number = 0
    while True:
        number += 1
        pause_s = repeat_s
        try:
            outcome = await tell_story(
                number,
                sandboxes,
                settings,
                ingress_url,
                timing=timing,
                ready_timeout_s=ready_timeout_s,
            )
        except Exception:
            log.exception("story failed", story=number)
        else:
            pause_s = 0.0 if outcome is None else repeat_s - outcome.runtime_s
        if repeat_s <= 0:
            return
        await asyncio.sleep(max(0.0, pause_s))
