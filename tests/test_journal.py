"""The journal's pure core and the operator's views of the ledger, without I/O."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bridge.status import advice, parse_duration, timeline
from shared import journal
from shared.errors import PermanentError
from shared.journal import Journal, State, changes
from shared.ledger import LATEST_VERSION, QUERIES, load_queries, migrations

VOUCHER = "7f0c1e3a-2b4d-4c5e-8f6a-9b0c1d2e3f40"
OTHER = "7f0c1e3a-2b4d-4c5e-8f6a-9b0c1d2e3f41"


def test_changes_take_the_latest_state_and_every_fact() -> None:
    steps = [
        journal.step(
            VOUCHER,
            "m2",
            "pdfs",
            "PDF stored",
            at_ms=3000,
            state=State.PDF_STORED,
            facts={"pdf_bytes": 10},
        ),
        journal.step(
            VOUCHER,
            "m1",
            "ingress",
            "received",
            at_ms=1000,
            state=State.RESERVED,
            facts={"coupon_id": "C", "pdf_bytes": None},
        ),
        journal.step(VOUCHER, "m2", "pdfs", "retried", at_ms=4000),
        journal.step(OTHER, "m3", "ingress", "received", at_ms=2000),
    ]
    by_voucher = {str(c.voucher_id): c for c in changes(steps)}
    change = by_voucher[VOUCHER]
    assert change.state == State.PDF_STORED  # the retried step after it sets no state
    assert change.state_at == datetime.fromtimestamp(3, UTC)
    assert change.facts == {"coupon_id": "C", "pdf_bytes": 10}
    assert change.first_seen == datetime.fromtimestamp(1, UTC)
    assert change.last_change == datetime.fromtimestamp(4, UTC)
    assert by_voucher[OTHER].state is None
    assert by_voucher[OTHER].state_at is None


def test_same_millisecond_orders_by_how_far_along() -> None:
    steps = [
        journal.step(VOUCHER, "a", "doshii", "activated", at_ms=5, state=State.ACTIVATED),
        journal.step(VOUCHER, "b", "pdfs", "PDF stored", at_ms=5, state=State.PDF_STORED),
    ]
    assert changes(steps)[0].state == State.ACTIVATED


def test_a_late_notification_never_moves_a_voucher_back() -> None:
    # Jackpot's RESERVED (or a repeated READY) can reach the ingress after the voucher was
    # activated from the intake's own RESERVED: it is recorded, but the state stays.
    steps = [
        journal.step(VOUCHER, "r", "intake", "reserved at Jackpot", at_ms=1, state=State.RESERVED),
        journal.step(VOUCHER, "a", "doshii", "activated", at_ms=5, state=State.ACTIVATED),
        journal.step(VOUCHER, "r2", "ingress", "received", at_ms=7, state=State.RESERVED),
        journal.step(VOUCHER, "y2", "ingress", "received", at_ms=8, state=State.READY),
    ]
    (change,) = changes(steps)
    assert change.state == State.ACTIVATED
    assert change.state_at == datetime.fromtimestamp(0.005, UTC)
    assert change.last_change == datetime.fromtimestamp(0.008, UTC)
    # Any other later step still moves it, back too: a replay from the dead queue.
    dead = journal.step(VOUCHER, "d", "doshii", "dead-lettered", at_ms=9, state=State.DEAD)
    replayed = journal.step(VOUCHER, "p", "dlq", "replayed", at_ms=10, state=State.REPLAYED)
    assert changes([*steps, dead])[0].state == State.DEAD
    assert changes([*steps, dead, replayed])[0].state == State.REPLAYED
    again = journal.step(VOUCHER, "r3", "ingress", "received", at_ms=11, state=State.RESERVED)
    assert changes([*steps, dead, replayed, again])[0].state == State.RESERVED


def test_encode_decode_round_trip_and_refusals() -> None:
    steps = [journal.step(VOUCHER, "m", "pdfs", "PDF stored", detail="x" * 2000)]
    (back,) = journal.decode(journal.encode(steps))
    assert back == steps[0]
    assert len(back.detail or "") == journal.DETAIL_MAX_CHARS
    for body in (b"not json", b'{"steps": []}', b'{"steps": [{"voucher_id": "nope"}]}'):
        with pytest.raises(PermanentError, match="not a journal message"):
            journal.decode(body)


async def test_journal_groups_steps_while_a_send_is_on_its_way() -> None:
    sent: list[int] = []
    release = asyncio.Event()

    async def send(body: bytes) -> None:
        sent.append(len(journal.decode(body)))
        if len(sent) == 1:
            await release.wait()

    book = Journal(send)
    first = asyncio.create_task(book.record([journal.step(VOUCHER, "m0", "pdfs", "x")]))
    await asyncio.sleep(0.01)  # the first send is on its way, and holds
    later = [
        asyncio.create_task(book.record([journal.step(VOUCHER, f"m{i}", "pdfs", "x")]))
        for i in range(1, 6)
    ]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in [first, *later])  # nothing confirmed yet
    release.set()
    await asyncio.gather(first, *later)
    assert sent == [1, 5]


async def test_a_failed_send_fails_every_record_waiting_on_it() -> None:
    async def send(body: bytes) -> None:
        raise ConnectionError("broker gone")

    book = Journal(send)
    results = await asyncio.gather(
        book.record([journal.step(VOUCHER, "m", "pdfs", "x")]),
        book.record([journal.step(VOUCHER, "n", "pdfs", "x")]),
        return_exceptions=True,
    )
    assert all(isinstance(r, ConnectionError) for r in results)


def test_queries_and_migrations_load_in_order() -> None:
    assert load_queries("-- name: a\nSELECT 1;\n-- name: b\nSELECT 2;\n") == {
        "a": "SELECT 1;",
        "b": "SELECT 2;",
    }
    assert {"insert_steps", "upsert_vouchers", "find_vouchers", "try_sweep_lock"} <= set(QUERIES)
    versions = [m.version for m in migrations()]
    assert versions == sorted(versions) == list(range(1, LATEST_VERSION + 1))


def test_parse_duration() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("1.5d") == timedelta(hours=36)
    for bad in ("", "2", "h", "2w", "-1h"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def _row(state: str, idle_s: float, now: datetime) -> dict[str, Any]:
    return {
        "voucher_id": VOUCHER,
        "coupon_id": "AGYPMNVXPJ",
        "location_id": "L",
        "request_id": "412",
        "amount_cents": 2500,
        "state": state,
        "state_at": now - timedelta(seconds=idle_s),
        "first_seen": now - timedelta(seconds=idle_s + 5),
        "last_change": now - timedelta(seconds=idle_s),
        "pdf_path": None,
        "pdf_bytes": None,
        "doshii_status": None,
    }


def test_advice_says_what_to_do_only_when_needed() -> None:
    now = datetime.now(UTC)
    assert advice(_row("activated", 10_000, now), 900, now) is None
    assert advice(_row("confirmed", 10, now), 900, now) is None
    stuck = advice(_row("confirmed", 1800, now), 900, now)
    assert stuck is not None
    assert "30 min" in stuck
    assert "Jackpot has not sent READY" in stuck
    assert "bridge dlq replay" in (advice(_row("dead", 1, now), 900, now) or "")
    assert "refund" in (advice(_row("refund_needed", 1, now), 900, now) or "")


def test_timeline_reads_as_a_story() -> None:
    now = datetime.now(UTC)
    row = _row("confirmed", 1800, now)
    journey = [
        {"stage": "ingress", "attempt": 0, "outcome": "received", "at": now, "detail": "RESERVED"},
        {
            "stage": "pdfs",
            "attempt": 1,
            "outcome": "PDF stored",
            "at": now,
            "detail": "PDF stored: /p.pdf (3 bytes)",
        },
    ]
    text = timeline(row, journey, 900, now)
    assert "coupon AGYPMNVXPJ" in text
    assert "amount 25.00" in text
    assert "received: RESERVED" in text
    assert "PDF stored: /p.pdf (3 bytes)" in text
    assert "PDF stored: PDF stored" not in text
    assert "to do: no change for 30 min" in text
