"""The pipeline benchmark's side-by-side part: medians per subject, ratios, the issue's targets.

A subject is one implementation of the whole job run as its own processes: `bridge` (this
project), `peer` (the FastStream peer of `../shared/anchors`) or `baseline` (voucher-bridge from
another checkout, to measure a change old against new). Each round measures every subject once
with the same driver and load; this module turns those measurements into medians, ratios of
bridge to each other subject, and the targets' verdicts. Everything here is free of I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bench.pipeline_stats import Figures
from bench.report import Target

BRIDGE = "bridge"
PEER = "peer"
BASELINE = "baseline"
# voucher-bridge with BRIDGE_LEDGER=false: what the ledger costs is the difference.
NO_LEDGER = "no-ledger"
SUBJECTS = (PEER, NO_LEDGER, BRIDGE)  # the default order within a round
KNOWN_SUBJECTS = (PEER, BASELINE, NO_LEDGER, BRIDGE)
# The ledger may cost this much CPU per voucher in all (its worker and PostgreSQL), and take
# at most this share of the vouchers/s.
TARGET_LEDGER_MAX_CPU_MS = 0.5
TARGET_LEDGER_MAX_SLOWDOWN = 0.15
THROUGHPUT = "throughput"
RATE = "rate"
# The targets, bridge against peer on medians of one run.
TARGET_MAX_CPU_RATIO = 0.5  # bridge CPU per voucher (ingress + workers) <= half the peer's
TARGET_MIN_THROUGHPUT_RATIO = 1.5  # closed-loop vouchers/s >= 1.5x the peer's
TARGET_MAX_P99_RATIO = 1.0  # p99 READY -> activated at the fixed rate no worse than the peer's


@dataclass(frozen=True)
class Measured:
    """One subject's measured phase in one round: its figures and CPU ms per voucher by row."""

    subject: str
    round_number: int
    phase: str  # THROUGHPUT or RATE
    figures: Figures
    cpu_ms: Mapping[str, float]  # row (process or total) -> CPU ms per voucher sent


@dataclass(frozen=True)
class SubjectSummary:
    """Medians over one subject's rounds, and its counts summed over every measured phase."""

    subject: str
    rounds: int
    per_s: float  # closed loop
    p50_ms: float  # READY -> activated at the fixed rate
    p99_ms: float
    cpu_ms: dict[str, float]  # throughput phase, by row
    rate_cpu_ms: dict[str, float]  # fixed-rate phase, by row
    sent: int
    activated: int
    dead: int
    lost: int

    def counts_line(self) -> str:
        """`sent = activated + dead + lost`, with its figures."""
        return (
            f"{self.subject}: sent {self.sent:,} = activated {self.activated:,} "
            f"+ dead {self.dead:,} + lost {self.lost:,}"
        )


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers; NaN when there are none."""
    numbers = [value for value in values if not math.isnan(value)]
    return statistics.median(numbers) if numbers else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when either is unknown or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def _row_medians(runs: Sequence[Measured], rows: Sequence[str]) -> dict[str, float]:
    return {row: median([run.cpu_ms.get(row, math.nan) for run in runs]) for row in rows}


def summarize(
    measured: Sequence[Measured], subjects: Sequence[str], rows: Sequence[str]
) -> list[SubjectSummary]:
    """One summary per subject that was measured, in the order of `subjects`."""
    summaries = []
    for subject in subjects:
        mine = [m for m in measured if m.subject == subject]
        if not mine:
            continue
        closed = [m for m in mine if m.phase == THROUGHPUT]
        fixed = [m for m in mine if m.phase == RATE]
        summaries.append(
            SubjectSummary(
                subject=subject,
                rounds=len({m.round_number for m in mine}),
                per_s=median([m.figures.per_s for m in closed]),
                p50_ms=median([m.figures.p50_ms for m in fixed]),
                p99_ms=median([m.figures.p99_ms for m in fixed]),
                cpu_ms=_row_medians(closed, rows),
                rate_cpu_ms=_row_medians(fixed, rows),
                sent=sum(m.figures.sent for m in mine),
                activated=sum(m.figures.activated for m in mine),
                dead=sum(m.figures.dead for m in mine),
                lost=sum(m.figures.lost for m in mine),
            )
        )
    return summaries


def by_subject(summaries: Sequence[SubjectSummary]) -> dict[str, SubjectSummary]:
    """The summaries by subject name."""
    return {summary.subject: summary for summary in summaries}


def fmt(value: float, digits: int) -> str:
    """A number with thousands separators, or `n/a` for NaN."""
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def times(value: float) -> str:
    """A ratio as `0.42x`, or `n/a`."""
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _others(summaries: Sequence[SubjectSummary]) -> list[SubjectSummary]:
    """The subjects bridge is divided by: every other one, when bridge ran."""
    if BRIDGE not in by_subject(summaries):
        return []
    return [s for s in summaries if s.subject != BRIDGE]


def ratio_headers(summaries: Sequence[SubjectSummary]) -> list[str]:
    """`bridge / peer`, `bridge / baseline`: one ratio column per other subject."""
    return [f"{BRIDGE} / {other.subject}" for other in _others(summaries)]


def _ratio_cells(
    summaries: Sequence[SubjectSummary], value: Callable[[SubjectSummary], float]
) -> list[str]:
    others = _others(summaries)
    if not others:
        return []
    bridge = by_subject(summaries)[BRIDGE]
    return [times(ratio(value(bridge), value(other))) for other in others]


def headline_headers(summaries: Sequence[SubjectSummary]) -> tuple[str, ...]:
    """`median`, one column per subject, then bridge's ratio to each other subject."""
    return ("median", *(s.subject for s in summaries), *ratio_headers(summaries))


def headline_rows(summaries: Sequence[SubjectSummary], total_row: str) -> list[list[str]]:
    """The issue's figures side by side: vouchers/s, p50 and p99 at the fixed rate, CPU/voucher."""
    lines: list[tuple[str, Callable[[SubjectSummary], float], int]] = [
        ("vouchers/s (closed loop)", lambda s: s.per_s, 1),
        ("READY -> activated p50 ms (fixed rate)", lambda s: s.p50_ms, 1),
        ("READY -> activated p99 ms (fixed rate)", lambda s: s.p99_ms, 1),
        (f"CPU ms per voucher, {total_row} (closed loop)", lambda s: s.cpu_ms[total_row], 2),
        (f"CPU ms per voucher, {total_row} (fixed rate)", lambda s: s.rate_cpu_ms[total_row], 2),
    ]
    return [
        [label, *(fmt(value(s), digits) for s in summaries), *_ratio_cells(summaries, value)]
        for label, value, digits in lines
    ]


def cpu_rows(
    summaries: Sequence[SubjectSummary],
    rows: Sequence[str],
    pick: Callable[[SubjectSummary], Mapping[str, float]],
) -> list[list[str]]:
    """One line per process (and total), one column per subject, then bridge's ratios."""
    lines = []
    for row in rows:

        def value(s: SubjectSummary, row: str = row) -> float:
            return pick(s)[row]

        cells = [fmt(value(s), 2) for s in summaries]
        lines.append([row, *cells, *_ratio_cells(summaries, value)])
    return lines


ROUND_HEADERS = (
    "round",
    "subject",
    "phase",
    "sent",
    "activated",
    "dead",
    "lost",
    "vouchers/s",
    "p50 ms",
    "p99 ms",
    "CPU ms/voucher",
)


def round_rows(measured: Sequence[Measured], total_row: str) -> list[list[str]]:
    """Every measured phase in the order it ran, for the per-round table."""
    return [
        [
            str(m.round_number),
            m.subject,
            m.phase,
            f"{m.figures.sent:,}",
            f"{m.figures.activated:,}",
            f"{m.figures.dead:,}",
            f"{m.figures.lost:,}",
            fmt(m.figures.per_s, 1),
            fmt(m.figures.p50_ms, 1),
            fmt(m.figures.p99_ms, 1),
            fmt(m.cpu_ms.get(total_row, math.nan), 2),
        ]
        for m in measured
    ]


def ledger_targets(summaries: Sequence[SubjectSummary], ledger_row: str) -> list[Target]:
    """The ledger's two targets, bridge against no-ledger; [] unless both were measured."""
    subjects = by_subject(summaries)
    bridge, bare = subjects.get(BRIDGE), subjects.get(NO_LEDGER)
    if bridge is None or bare is None:
        return []
    cost_ms = bridge.cpu_ms[ledger_row]
    slowdown = 1 - ratio(bridge.per_s, bare.per_s)
    return [
        Target(
            f"the ledger's CPU per voucher ({ledger_row}, closed loop) <= "
            f"{TARGET_LEDGER_MAX_CPU_MS:g} ms",
            f"{fmt(cost_ms, 3)} ms",
            cost_ms <= TARGET_LEDGER_MAX_CPU_MS,
        ),
        Target(
            f"vouchers/s with the ledger >= {1 - TARGET_LEDGER_MAX_SLOWDOWN:g}x without it",
            f"{times(1 - slowdown)} ({fmt(bridge.per_s, 1)} vs {fmt(bare.per_s, 1)}): "
            f"{slowdown * 100:.1f} % fewer",
            slowdown <= TARGET_LEDGER_MAX_SLOWDOWN,
        ),
    ]


def comparison_targets(
    summaries: Sequence[SubjectSummary], total_row: str, rate_per_s: int
) -> list[Target]:
    """The issue's four targets, bridge against peer; [] unless both were measured."""
    subjects = by_subject(summaries)
    bridge, peer = subjects.get(BRIDGE), subjects.get(PEER)
    if bridge is None or peer is None:
        return []
    cpu = ratio(bridge.cpu_ms[total_row], peer.cpu_ms[total_row])
    throughput = ratio(bridge.per_s, peer.per_s)
    p99 = ratio(bridge.p99_ms, peer.p99_ms)
    return [
        Target(
            f"bridge CPU per voucher ({total_row}, closed loop) <= "
            f"{TARGET_MAX_CPU_RATIO:g}x the peer's",
            f"{times(cpu)} ({fmt(bridge.cpu_ms[total_row], 2)} ms vs "
            f"{fmt(peer.cpu_ms[total_row], 2)} ms)",
            cpu <= TARGET_MAX_CPU_RATIO,
        ),
        Target(
            f"bridge vouchers/s (closed loop) >= {TARGET_MIN_THROUGHPUT_RATIO:g}x the peer's",
            f"{times(throughput)} ({fmt(bridge.per_s, 1)} vs {fmt(peer.per_s, 1)})",
            throughput >= TARGET_MIN_THROUGHPUT_RATIO,
        ),
        Target(
            f"bridge p99 READY -> activated at {rate_per_s}/s offered no worse than the peer's",
            f"{times(p99)} ({fmt(bridge.p99_ms, 1)} ms vs {fmt(peer.p99_ms, 1)} ms)",
            p99 <= TARGET_MAX_P99_RATIO,
        ),
        Target(
            "lost 0 for both",
            f"bridge {bridge.lost:,} lost of {bridge.sent:,}, peer {peer.lost:,} lost of "
            f"{peer.sent:,}",
            bridge.lost == 0 and peer.lost == 0,
        ),
    ]
