"""Per-run figures, medians per server, the ingress's ratios and targets, as text and markdown."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.procstat import ticks_to_us
from bench.wrk import WrkResult

SUBJECT = "ingress"
NAIVE = "naive"
TARGET_MIN_ACCEPTED_RATIO_VS_NAIVE = 2.0
TARGET_MAX_SERVER_CPU_US_PER_ACCEPTED = 300.0
TARGET_MAX_P99_RATIO_VS_NAIVE = 0.5


@dataclass(frozen=True)
class Run:
    """One measured wrk run against one server, with the CPU used meanwhile."""

    server: str
    round_number: int
    wrk: WrkResult
    server_cpu_ticks: int
    broker_cpu_ticks: int

    def _per_accepted_us(self, ticks: int) -> float:
        return ticks_to_us(ticks) / self.wrk.accepted if self.wrk.accepted else math.nan

    @property
    def server_cpu_us_per_accepted(self) -> float:
        """Server CPU per 2xx answer, in µs (NaN when nothing was accepted)."""
        return self._per_accepted_us(self.server_cpu_ticks)

    @property
    def broker_cpu_us_per_accepted(self) -> float:
        """Broker CPU per 2xx answer, in µs (NaN when nothing was accepted)."""
        return self._per_accepted_us(self.broker_cpu_ticks)


@dataclass(frozen=True)
class StoredCheck:
    """After an ingress run: messages in the reservations queue against the 200s given."""

    round_number: int
    stored: int | None
    server_ok_answers: int
    server_spooled: int
    wrk_accepted: int
    connections: int
    server: str = SUBJECT

    @property
    def answered_after_wrk_stopped(self) -> int:
        """200s wrk never read: requests in flight when its duration ran out."""
        return self.server_ok_answers - self.wrk_accepted

    @property
    def ok(self) -> bool:
        """Every 200 is in the queue, none spooled, and wrk read all but the cut-off ones."""
        return (
            self.stored is not None
            and self.server_spooled == 0
            and self.stored == self.server_ok_answers
            and 0 <= self.answered_after_wrk_stopped <= self.connections
        )

    def line(self) -> str:
        """One line saying whether the check held, with its figures."""
        verdict = "stored = accepted: OK" if self.ok else "STORED != ACCEPTED: MISMATCH"
        stored = "no queue" if self.stored is None else f"{self.stored:,}"
        return (
            f"round {self.round_number} {self.server} {verdict} (stored {stored}; "
            f"200s counted by the ingress {self.server_ok_answers:,}, of them spooled "
            f"{self.server_spooled:,}; 2xx read by wrk {self.wrk_accepted:,} + "
            f"{self.answered_after_wrk_stopped:,} answered after wrk stopped, "
            f"at most {self.connections} expected)"
        )


@dataclass(frozen=True)
class Summary:
    """Medians over the rounds of one server."""

    server: str
    rounds: int
    accepted_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float
    broker_cpu_us: float
    non_2xx: int
    socket_errors: int

    @property
    def total_cpu_us(self) -> float:
        """Server plus broker CPU per accepted request, in µs."""
        return self.server_cpu_us + self.broker_cpu_us


@dataclass(frozen=True)
class Target:
    """One target of the ingress issue, judged on the medians."""

    description: str
    measured: str
    passed: bool

    def line(self) -> str:
        """The line to print: PASS or FAIL, what is required, what was measured."""
        return f"{'PASS' if self.passed else 'FAIL'}  {self.description}: {self.measured}"


def _median(runs: Sequence[Run], value: Callable[[Run], float]) -> float:
    values = [value(run) for run in runs if not math.isnan(value(run))]
    return statistics.median(values) if values else math.nan


def summarize(runs: Sequence[Run], servers: Sequence[str]) -> list[Summary]:
    """One Summary per server that has runs, in the order of `servers`."""
    summaries = []
    for server in servers:
        mine = [run for run in runs if run.server == server]
        if not mine:
            continue
        summaries.append(
            Summary(
                server=server,
                rounds=len(mine),
                accepted_per_s=_median(mine, lambda r: r.wrk.accepted_per_s),
                p50_ms=_median(mine, lambda r: r.wrk.latency_p50_ms),
                p99_ms=_median(mine, lambda r: r.wrk.latency_p99_ms),
                server_cpu_us=_median(mine, lambda r: r.server_cpu_us_per_accepted),
                broker_cpu_us=_median(mine, lambda r: r.broker_cpu_us_per_accepted),
                non_2xx=sum(run.wrk.non_2xx for run in mine),
                socket_errors=sum(run.wrk.socket_errors for run in mine),
            )
        )
    return summaries


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _by_name(summaries: Sequence[Summary]) -> dict[str, Summary]:
    return {summary.server: summary for summary in summaries}


def evaluate_targets(summaries: Sequence[Summary]) -> list[Target]:
    """The ingress issue's targets, judged on the medians."""
    by_name = _by_name(summaries)
    subject, naive = by_name.get(SUBJECT), by_name.get(NAIVE)
    if subject is None or naive is None:
        return []
    throughput = _ratio(subject.accepted_per_s, naive.accepted_per_s)
    p99 = _ratio(subject.p99_ms, naive.p99_ms)
    return [
        Target(
            f"ingress accepted/s >= {TARGET_MIN_ACCEPTED_RATIO_VS_NAIVE:g}x naive",
            f"{throughput:.2f}x",
            throughput >= TARGET_MIN_ACCEPTED_RATIO_VS_NAIVE,
        ),
        Target(
            f"ingress server CPU <= {TARGET_MAX_SERVER_CPU_US_PER_ACCEPTED:.0f} µs per accepted",
            f"{subject.server_cpu_us:.0f} µs",
            subject.server_cpu_us <= TARGET_MAX_SERVER_CPU_US_PER_ACCEPTED,
        ),
        Target(
            f"ingress p99 <= {TARGET_MAX_P99_RATIO_VS_NAIVE:g}x naive p99",
            f"{p99:.2f}x ({subject.p99_ms:.1f} ms vs {naive.p99_ms:.1f} ms)",
            p99 <= TARGET_MAX_P99_RATIO_VS_NAIVE,
        ),
    ]


TARGET_MAX_SERVER_CPU_RATIO_VS_NAIVE = 0.5


def cluster_targets(summaries: Sequence[Summary], subject: str, naive: str) -> list[Target]:
    """The targets on the cluster: >= 2x naive's accepted/s, <= 1/2 its server CPU per request."""
    by_name = _by_name(summaries)
    mine, theirs = by_name.get(subject), by_name.get(naive)
    if mine is None or theirs is None:
        return []
    throughput = _ratio(mine.accepted_per_s, theirs.accepted_per_s)
    cpu = _ratio(mine.server_cpu_us, theirs.server_cpu_us)
    return [
        Target(
            f"{subject} accepted/s >= {TARGET_MIN_ACCEPTED_RATIO_VS_NAIVE:g}x {naive}",
            f"{throughput:.2f}x",
            throughput >= TARGET_MIN_ACCEPTED_RATIO_VS_NAIVE,
        ),
        Target(
            f"{subject} server CPU per accepted <= {TARGET_MAX_SERVER_CPU_RATIO_VS_NAIVE:g}x "
            f"{naive}'s",
            f"{cpu:.2f}x ({mine.server_cpu_us:.0f} µs vs {theirs.server_cpu_us:.0f} µs)",
            cpu <= TARGET_MAX_SERVER_CPU_RATIO_VS_NAIVE,
        ),
    ]


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _times(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


SUMMARY_HEADERS = (
    "server",
    "accepted/s",
    "p50 ms",
    "p99 ms",
    "server CPU µs/accepted",
    "broker CPU µs/accepted",
    "non-2xx",
    "socket errors",
)
RATIO_HEADERS = (
    "ingress vs",
    "accepted/s ratio",
    "p99 ratio",
    "server CPU ratio",
    "server+broker CPU ratio",
)
RUN_HEADERS = (
    "round",
    "server",
    "requests",
    "duration s",
    "accepted/s",
    "p50 ms",
    "p99 ms",
    "server CPU µs/accepted",
    "broker CPU µs/accepted",
    "non-2xx",
    "socket errors",
)


def summary_rows(summaries: Sequence[Summary]) -> list[list[str]]:
    """Cells for SUMMARY_HEADERS, one row per server."""
    return [
        [
            s.server,
            _fmt(s.accepted_per_s, 0),
            _fmt(s.p50_ms, 2),
            _fmt(s.p99_ms, 2),
            _fmt(s.server_cpu_us, 0),
            _fmt(s.broker_cpu_us, 0),
            f"{s.non_2xx:,}",
            f"{s.socket_errors:,}",
        ]
        for s in summaries
    ]


def ratio_rows(
    summaries: Sequence[Summary], pairs: Sequence[tuple[str, str]] | None = None
) -> list[list[str]]:
    """Each (subject, other) pair's medians divided; by default the ingress vs every other."""
    by_name = _by_name(summaries)
    if pairs is None:
        pairs = [(SUBJECT, s.server) for s in summaries if s.server != SUBJECT]
    rows = []
    for subject_name, other_name in pairs:
        subject, other = by_name.get(subject_name), by_name.get(other_name)
        if subject is None or other is None:
            continue
        label = other.server if subject_name == SUBJECT else f"{subject_name} vs {other_name}"
        rows.append(
            [
                label,
                _times(_ratio(subject.accepted_per_s, other.accepted_per_s)),
                _times(_ratio(subject.p99_ms, other.p99_ms)),
                _times(_ratio(subject.server_cpu_us, other.server_cpu_us)),
                _times(_ratio(subject.total_cpu_us, other.total_cpu_us)),
            ]
        )
    return rows


def run_rows(runs: Sequence[Run]) -> list[list[str]]:
    """Cells for RUN_HEADERS, one row per measured run."""
    return [
        [
            str(run.round_number),
            run.server,
            f"{run.wrk.requests:,}",
            _fmt(run.wrk.duration_s, 2),
            _fmt(run.wrk.accepted_per_s, 0),
            _fmt(run.wrk.latency_p50_ms, 2),
            _fmt(run.wrk.latency_p99_ms, 2),
            _fmt(run.server_cpu_us_per_accepted, 0),
            _fmt(run.broker_cpu_us_per_accepted, 0),
            f"{run.wrk.non_2xx:,}",
            f"{run.wrk.socket_errors:,}",
        ]
        for run in runs
    ]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        padded = [first.ljust(widths[0])]
        padded += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    align = ["---", *("---:" for _ in headers[1:])]
    lines = [headers, align, *rows]
    return "\n".join(f"| {' | '.join(cells)} |" for cells in lines)
