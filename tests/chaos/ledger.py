"""The ledger a scenario ends with: where every accepted notification went, and what Doshii saw.

A voucher counts as accepted once the ingress answered 200 to one of its notifications. Each
accepted voucher must end in exactly one place: activated or cancelled (Doshii's final status)
or dead-lettered (with a reason). `lost` is what is in none of them and must be 0.

Time to drain runs from the end of the fault (broker restored, partner healed, process
restarted; for scenario 6, the first notification) until every voucher is accounted for and no
queue, tier, spool or worker holds anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.server import Sandboxes
from tests.support.pipeline import Voucher
from tests.support.report import add_row
from workers.dlq import DeadLetter

TABLE = "chaos ledger"
COLUMNS = (
    "scenario",
    "vouchers sent",
    "accepted",
    "activated",
    "cancelled",
    "dead",
    "lost",
    "duplicates seen",
    "time to drain (s)",
)
LATEST = Path(__file__).resolve().parents[2] / "var" / "chaos-latest.md"
# Every ledger of this run, in order: what var/chaos-latest.md shows.
LEDGERS: list[Ledger] = []


@dataclass
class Ledger:
    scenario: str
    sent: int
    accepted: int
    notifications: int  # notifications answered 200 (a voucher has several)
    activated: int
    cancelled: int
    dead: int
    lost: int
    duplicates: int  # vouchers some stage processed more than once
    drain_s: float | None  # None: it never settled
    lost_ids: list[str] = field(default_factory=list)
    # A voucher in two places at once: final in Doshii *and* dead-lettered.
    conflicts: list[str] = field(default_factory=list)
    # Doshii received contradicting or repeated accepted updates for one request.
    contradictions: list[str] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self) -> tuple[object, ...]:
        drain = "never" if self.drain_s is None else f"{self.drain_s:.1f}"
        return (
            self.scenario,
            self.sent,
            self.accepted,
            self.activated,
            self.cancelled,
            self.dead,
            self.lost,
            self.duplicates,
            drain,
        )


def reckon(
    scenario: str,
    vouchers: Sequence[Voucher],
    sandboxes: Sandboxes,
    letters: Sequence[DeadLetter],
    drain_s: float | None,
) -> Ledger:
    """Count where every voucher of the scenario ended, from the sandboxes and the dead queue."""
    jackpot, doshii = sandboxes.jackpot, sandboxes.doshii
    ids = {v.voucher_id for v in vouchers}
    answered = [d for d in jackpot.deliveries if d.voucher_id in ids and d.status == 200]
    accepted = [v for v in vouchers if any(d.voucher_id == v.voucher_id for d in answered)]
    dead_ids = {letter.voucher_id for letter in letters}

    activated = cancelled = dead = 0
    lost_ids: list[str] = []
    conflicts: list[str] = []
    for voucher in accepted:
        status = doshii.requests[voucher.request_id]["status"]
        is_dead = voucher.voucher_id in dead_ids
        if status == "activated":
            activated += 1
        elif status == "cancelled":
            cancelled += 1
        elif is_dead:
            dead += 1
        else:
            lost_ids.append(f"{voucher.voucher_id} (Doshii {voucher.request_id} is {status})")
        if is_dead and status in ("activated", "cancelled"):
            conflicts.append(f"{voucher.voucher_id}: {status} in Doshii and dead-lettered")

    confirm_twice = pdf_twice = put_409 = 0
    duplicated: set[str] = set()
    contradictions: list[str] = []
    for voucher in vouchers:
        vid, rid = voucher.voucher_id, voucher.request_id
        puts = doshii.puts.get(rid, [])
        if jackpot.confirm_calls[vid] > 1:
            confirm_twice += 1
            duplicated.add(vid)
        if jackpot.pdf_downloads[vid] > 1:
            pdf_twice += 1
            duplicated.add(vid)
        if any(p["status"] == 409 for p in puts):
            put_409 += 1
            duplicated.add(vid)
        contradictions += contradicting(rid, puts, doshii.logs.get(rid, []))

    notes = [
        f"{len(answered)} notifications answered 200",
        f"duplicates: {confirm_twice} confirmed twice or more, {pdf_twice} PDFs downloaded "
        f"twice or more, {put_409} Doshii updates repeated (answered 409)",
    ]
    return Ledger(
        scenario=scenario,
        sent=len(vouchers),
        accepted=len(accepted),
        notifications=len(answered),
        activated=activated,
        cancelled=cancelled,
        dead=dead,
        lost=len(accepted) - (activated + cancelled + dead),
        duplicates=len(duplicated),
        drain_s=drain_s,
        lost_ids=lost_ids,
        conflicts=conflicts,
        contradictions=contradictions,
        letters=list(letters),
        notes=notes,
    )


def contradicting(
    request_id: str, puts: Sequence[dict[str, object]], applied: Sequence[dict[str, object]]
) -> list[str]:
    """What is wrong with the updates Doshii accepted for one request (nothing, normally).

    `puts` are the PUTs as answered (status 0: the caller hung up first); `applied` are the
    updates Doshii applied, whether or not the caller heard the answer.
    """
    problems = []
    accepted = [p for p in puts if p["status"] == 200]
    if len(accepted) > 1:
        problems.append(f"Doshii {request_id}: {len(accepted)} PUTs answered 200")
    if len(applied) > 1:
        statuses = [str(entry.get("status")) for entry in applied]
        problems.append(f"Doshii {request_id}: {len(applied)} updates applied: {statuses}")
    bodies = [p["body"] for p in accepted] + list(applied)
    wanted = {str(b.get("status")) for b in bodies if isinstance(b, dict)}
    if {"activated", "cancelled"} <= wanted:
        problems.append(f"Doshii {request_id}: accepted both 'activated' and 'cancelled'")
    return problems


def record(ledger: Ledger, *, extra_notes: Sequence[str] = ()) -> None:
    """Add the ledger to the run's table (printed at the end) and to var/chaos-latest.md."""
    ledger.notes.extend(extra_notes)
    LEDGERS.append(ledger)
    add_row(TABLE, COLUMNS, ledger.row())
    LATEST.parent.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(markdown(LEDGERS))


def markdown(ledgers: Sequence[Ledger]) -> str:
    lines = [
        "# Chaos ledger (latest run)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in ledger.row()) + " |" for ledger in ledgers]
    lines += [
        "",
        "Accepted: vouchers the ingress answered 200 for. Duplicates seen: vouchers some stage",
        "processed more than once (confirmed twice, PDF fetched twice, Doshii PUT answered 409).",
        "Time to drain: from the end of the fault until nothing is left anywhere.",
        "",
    ]
    for ledger in ledgers:
        lines.append(f"- **{ledger.scenario}**: " + "; ".join(ledger.notes))
        lines += [f"  - dead letter: {letter.stage}: {letter.reason}" for letter in ledger.letters]
        lines += [f"  - LOST: {lost}" for lost in ledger.lost_ids]
        lines += [f"  - CONFLICT: {c}" for c in ledger.conflicts]
        lines += [f"  - CONTRADICTION: {c}" for c in ledger.contradictions]
    return "\n".join(lines) + "\n"


def check(ledger: Ledger, *, dead_allowed: bool = False) -> None:
    """The asserts every scenario makes: nothing lost, nothing contradicting, dead letters only
    where the scenario expects them, each with a reason."""
    assert ledger.lost == 0, f"{ledger.scenario}: lost {ledger.lost}: {ledger.lost_ids}"
    assert ledger.accepted == ledger.sent, (
        f"{ledger.scenario}: only {ledger.accepted} of {ledger.sent} vouchers were accepted"
    )
    assert not ledger.contradictions, ledger.contradictions
    assert not ledger.conflicts, ledger.conflicts
    for letter in ledger.letters:
        assert letter.reason.strip(), f"dead letter {letter.message_id} has no reason"
    if not dead_allowed:
        reasons = [f"{letter.stage}: {letter.reason}" for letter in ledger.letters]
        assert not ledger.letters, f"{ledger.scenario}: unexpected dead letters: {reasons}"
