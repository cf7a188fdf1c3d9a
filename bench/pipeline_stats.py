"""The pipeline benchmark's pure parts: voucher traces, percentiles, counts, thread CPU, knobs.

Everything here is free of I/O so that tests can pin it down; `bench.pipeline` does the running.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from bench.procstat import parse_cpu_ticks, ticks_to_us
from sandbox.timestamps import parse_iso

MS_PER_S = 1000.0
US_PER_MS = 1000.0
PERCENT = 100.0


def parse_own_cpu_ticks(stat_line: str) -> int:
    """utime + stime, in clock ticks, from a /proc/PID/stat or /proc/PID/task/TID/stat line."""
    return parse_cpu_ticks(stat_line, with_children=False)


# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal ...; busy ones by index.
_MACHINE_BUSY_COLUMNS = (0, 1, 2, 5, 6)


def parse_machine_busy_ticks(proc_stat: str) -> int:
    """Busy clock ticks of all CPUs together (user, nice, system, irq, softirq) from /proc/stat."""
    for line in proc_stat.splitlines():
        name, *columns = line.split() or [""]
        if name == "cpu":
            if len(columns) <= max(_MACHINE_BUSY_COLUMNS):
                raise ValueError(f"/proc/stat cpu line too short: {line!r}")
            return sum(int(columns[index]) for index in _MACHINE_BUSY_COLUMNS)
    raise ValueError("/proc/stat has no cpu line")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` (0..1) quantile, interpolated between closest ranks; NaN when empty."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, not {fraction}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    weight = position - below
    return ordered[below] + (ordered[above] - ordered[below]) * weight


def epoch_s(iso_text: str) -> float:
    """Seconds since the epoch of an ISO 8601 date as the sandboxes write it (`...Z`)."""
    return parse_iso(iso_text).timestamp()


@dataclass
class Trace:
    """One voucher's way through the pipeline; times in epoch seconds (`time.time()`)."""

    voucher_id: str
    request_id: str
    reserved_sent_s: float
    ready_accepted_s: float | None = None
    activated_s: float | None = None
    failure: str | None = None

    @property
    def activated(self) -> bool:
        """Whether Doshii's request became activated."""
        return self.activated_s is not None

    @property
    def latency_ms(self) -> float | None:
        """READY answered 200 -> Doshii's request activated, in ms; None unless both happened."""
        if self.ready_accepted_s is None or self.activated_s is None:
            return None
        return (self.activated_s - self.ready_accepted_s) * MS_PER_S


@dataclass(frozen=True)
class Figures:
    """What one phase comes to: counts, sustained rate and READY -> activated latency."""

    sent: int
    activated: int
    dead: int  # vouchers of the phase with at least one dead letter
    lost: int  # vouchers neither activated nor dead-lettered: dropped somewhere
    span_s: float  # first RESERVED sent -> last activation
    p50_ms: float
    p99_ms: float

    @property
    def per_s(self) -> float:
        """Activated vouchers per second over the span (NaN for an empty span)."""
        return self.activated / self.span_s if self.span_s > 0 else math.nan


def figures(traces: Sequence[Trace], dead_voucher_ids: Collection[str]) -> Figures:
    """Counts, span and latency percentiles of a phase's traces.

    `lost` is sent - activated - dead whenever no voucher was both activated and dead-lettered;
    it is counted directly, so such a voucher cannot hide a lost one.
    """
    activated_at = [t.activated_s for t in traces if t.activated_s is not None]
    dead = sum(1 for t in traces if t.voucher_id in dead_voucher_ids)
    lost = sum(1 for t in traces if t.activated_s is None and t.voucher_id not in dead_voucher_ids)
    latencies = [ms for t in traces if (ms := t.latency_ms) is not None]
    span_s = math.nan
    if activated_at:
        span_s = max(activated_at) - min(t.reserved_sent_s for t in traces)
    return Figures(
        sent=len(traces),
        activated=len(activated_at),
        dead=dead,
        lost=lost,
        span_s=span_s,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
    )


def failure_counts(traces: Iterable[Trace]) -> dict[str, int]:
    """How many traces failed for each reason (reasons as the driver wrote them)."""
    counts: dict[str, int] = {}
    for trace in traces:
        if trace.failure is not None:
            counts[trace.failure] = counts.get(trace.failure, 0) + 1
    return counts


def cpu_deltas(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Per-name tick differences, for the names read both times (in `after`'s order)."""
    return {name: after[name] - before[name] for name in after if name in before}


def cpu_ms_per_voucher(ticks: int, vouchers: int) -> float:
    """CPU milliseconds per voucher; NaN when there were none."""
    return ticks_to_us(ticks) / US_PER_MS / vouchers if vouchers else math.nan


def core_percent(ticks: int, wall_s: float) -> float:
    """CPU used over a wall-clock window as a percentage of one core; NaN for no window."""
    return ticks_to_us(ticks) / US_PER_MS / MS_PER_S / wall_s * PERCENT if wall_s > 0 else math.nan


def ceiling_per_s(cpu_ms_per_voucher: float, cores: int) -> float:
    """Vouchers/s that `cores` fully busy CPUs allow at this CPU cost; NaN when it is unknown."""
    if math.isnan(cpu_ms_per_voucher) or cpu_ms_per_voucher <= 0:
        return math.nan
    return cores * MS_PER_S / cpu_ms_per_voucher


def positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    """A positive integer from `env[name]`, or `default` when unset; SystemExit when bad."""
    text = env.get(name, str(default)).strip()
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"{name} must be a positive integer, not {text!r}")
    return int(text)


def non_negative_int(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number >= 0 from `env[name]`, or `default` when unset; SystemExit when bad."""
    text = env.get(name, str(default)).strip()
    if not text.isdigit():
        raise SystemExit(f"{name} must be a whole number >= 0, not {text!r}")
    return int(text)


def parse_subjects(text: str, known: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list of subjects, each known and named once; SystemExit when bad."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise SystemExit(
            f"BENCH_PIPELINE_SUBJECTS must name some of {', '.join(known)}, each once, not {text!r}"
        )
    return names


def peer_dead_letter(
    correlation_id: str | None, body: bytes, headers: Mapping[str, object]
) -> tuple[str, str]:
    """(voucher id, reason) of a dead letter in the FastStream peer's `<ns>-peer.dead`.

    The peer sets the voucher id as correlation id on everything it publishes; the body (a
    voucher, or a Doshii update) says it too. The broker's x-first-death-* headers give the
    reason: `rejected` (a permanent failure) or `delivery_limit`.
    """
    voucher_id = correlation_id or ""
    if not voucher_id:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            voucher_id = str(data.get("id") or data.get("voucher_id") or "")
    reason = _header_text(headers.get("x-first-death-reason")) or "unknown"
    queue = _header_text(headers.get("x-first-death-queue")) or "unknown queue"
    return voucher_id, f"broker dead-lettered from {queue}: {reason}"


def _header_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)
