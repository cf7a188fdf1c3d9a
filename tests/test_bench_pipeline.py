"""The pipeline benchmark's pure helpers: traces, figures, percentiles, /proc and py-spy text."""

from __future__ import annotations

import math

import pytest

from bench.pipeline_stats import (
    Trace,
    ceiling_per_s,
    core_percent,
    cpu_deltas,
    cpu_ms_per_voucher,
    epoch_s,
    failure_counts,
    figures,
    non_negative_int,
    parse_machine_busy_ticks,
    parse_own_cpu_ticks,
    percentile,
    positive_int,
)
from bench.procstat import CLOCK_TICKS_PER_S
from bench.pyspy import (
    UVLOOP_LEAF,
    UVLOOP_PACKAGE,
    Stack,
    inclusive_by_function,
    package_of,
    parse_folded,
    self_by_line,
    self_by_package,
    split_threads,
    summary,
    without_line,
)

# /proc/PID/task/TID/stat of a thread: utime 5948, stime 2160, cutime 7, cstime 3 (the process's).
TASK_STAT = (
    "2937 (sand boxes) S 1 2936 2936 0 -1 4194304 184974 0 1 0 5948 2160 7 3 20 0 20 0 5707 "
    "2664251392 113935 18446744073709551615 94899740430336 94899743093961 140730776499760 0\n"
)

PROC_STAT = """\
cpu  1000 20 300 90000 50 7 11 5 0 0
cpu0 500 10 150 45000 25 3 5 2 0 0
intr 12345 0 0
"""

FOLDED = """\
<module> (bridge/cli.py:180);run (asyncio/runners.py:118);_write (shared/logs.py:22) 30
<module> (bridge/cli.py:180);run (asyncio/runners.py:118);handle (workers/pdfs.py:150);\
store (workers/pdfs.py:104) 50
<module> (bridge/cli.py:180);run (asyncio/runners.py:118);_run_once (uvloop/__init__.py:3) 20
"""
# What uvloop's C loop looks like: the Python frame that called into it is the leaf.
LOOP_FOLDED = """main (bridge/cli.py:9);Runner.run (asyncio/runners.py:118) 6
main (bridge/cli.py:9);handle (workers/doshii.py:40);put (shared/partners.py:150) 3
main (bridge/cli.py:9);handle (workers/doshii.py:40);dumps (json/__init__.py:231) 1
"""


def _trace(
    voucher_id: str,
    sent_s: float,
    ready_s: float | None = None,
    activated_s: float | None = None,
) -> Trace:
    return Trace(voucher_id, f"r-{voucher_id}", sent_s, ready_s, activated_s)


def test_percentile_interpolates_between_ranks() -> None:
    values = [40.0, 10.0, 30.0, 20.0]
    assert percentile(values, 0.0) == 10.0
    assert percentile(values, 1.0) == 40.0
    assert percentile(values, 0.5) == pytest.approx(25.0)
    assert percentile(list(map(float, range(1, 101))), 0.99) == pytest.approx(99.01)
    assert percentile([7.0], 0.99) == 7.0


def test_percentile_of_nothing_is_nan_and_fraction_is_checked() -> None:
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError, match="fraction"):
        percentile([1.0], 99)


def test_trace_latency_needs_both_ends() -> None:
    assert _trace("a", 1.0, 2.0, 2.25).latency_ms == pytest.approx(250.0)
    assert _trace("a", 1.0, 2.0).latency_ms is None
    assert _trace("a", 1.0, None, 2.0).latency_ms is None
    assert not _trace("a", 1.0, 2.0).activated


def test_figures_count_rate_and_latency() -> None:
    traces = [
        _trace("a", 10.0, 10.5, 10.6),
        _trace("b", 10.2, 10.7, 11.0),
        _trace("c", 10.4, 10.9),  # dead-lettered
        _trace("d", 10.6),  # lost
    ]
    result = figures(traces, {"c", "unrelated"})
    assert (result.sent, result.activated, result.dead, result.lost) == (4, 2, 1, 1)
    assert result.span_s == pytest.approx(1.0)  # first sent 10.0 -> last activation 11.0
    assert result.per_s == pytest.approx(2.0)
    assert result.p50_ms == pytest.approx(200.0)  # 100 ms and 300 ms
    assert result.p99_ms == pytest.approx(298.0)


def test_figures_activated_and_dead_is_not_lost() -> None:
    result = figures([_trace("a", 1.0, 1.1, 1.2)], {"a"})
    assert (result.activated, result.dead, result.lost) == (1, 1, 0)


def test_figures_of_nothing_activated() -> None:
    result = figures([_trace("a", 1.0)], set())
    assert result.lost == 1
    assert math.isnan(result.span_s)
    assert math.isnan(result.per_s)
    assert math.isnan(result.p99_ms)


def test_failure_counts() -> None:
    traces = [_trace("a", 1.0), _trace("b", 1.0), _trace("c", 1.0)]
    traces[0].failure = traces[2].failure = "READY never answered 200"
    assert failure_counts(traces) == {"READY never answered 200": 2}


def test_epoch_of_sandbox_timestamps() -> None:
    assert epoch_s("1970-01-01T00:00:01.250Z") == pytest.approx(1.25)


def test_own_cpu_ticks_leave_children_out() -> None:
    assert parse_own_cpu_ticks(TASK_STAT) == 5948 + 2160
    with pytest.raises(ValueError, match="stat"):
        parse_own_cpu_ticks("garbage")
    with pytest.raises(ValueError, match="too short"):
        parse_own_cpu_ticks("1 (x) S 1 2 3")


def test_machine_busy_ticks() -> None:
    assert parse_machine_busy_ticks(PROC_STAT) == 1000 + 20 + 300 + 7 + 11
    with pytest.raises(ValueError, match="no cpu line"):
        parse_machine_busy_ticks("intr 1\n\n")
    with pytest.raises(ValueError, match="too short"):
        parse_machine_busy_ticks("cpu 1 2 3\n")


def test_cpu_arithmetic() -> None:
    assert cpu_deltas({"a": 5, "b": 1}, {"a": 8, "c": 2}) == {"a": 3}
    one_second = CLOCK_TICKS_PER_S
    assert cpu_ms_per_voucher(one_second, 100) == pytest.approx(10.0)
    assert math.isnan(cpu_ms_per_voucher(one_second, 0))
    assert core_percent(one_second, 2.0) == pytest.approx(50.0)
    assert math.isnan(core_percent(one_second, 0.0))


def test_ceiling() -> None:
    assert ceiling_per_s(16.0, 2) == pytest.approx(125.0)
    assert math.isnan(ceiling_per_s(0.0, 2))
    assert math.isnan(ceiling_per_s(math.nan, 2))


def test_env_knobs() -> None:
    assert positive_int({}, "N", 3) == 3
    assert positive_int({"N": " 12 "}, "N", 3) == 12
    assert non_negative_int({"N": "0"}, "N", 3) == 0
    for bad in ("0", "-1", "x", ""):
        with pytest.raises(SystemExit, match="N must be"):
            positive_int({"N": bad}, "N", 3)
    with pytest.raises(SystemExit, match="N must be"):
        non_negative_int({"N": "1.5"}, "N", 3)


def test_folded_stacks_parse() -> None:
    stacks = parse_folded(FOLDED + "\n")
    assert [s.samples for s in stacks] == [30, 50, 20]
    assert stacks[1].frames[-1] == "store (workers/pdfs.py:104)"
    with pytest.raises(ValueError, match="folded"):
        parse_folded("no count here\n")


def test_hot_spots_self_package_and_inclusive() -> None:
    stacks = parse_folded(FOLDED)
    by_line = self_by_line(stacks, top=2)
    assert [(s.name, s.samples) for s in by_line] == [
        ("store (workers/pdfs.py:104)", 50),
        ("_write (shared/logs.py:22)", 30),
    ]
    assert by_line[0].percent == pytest.approx(50.0)
    packages = {s.name: s.percent for s in self_by_package(stacks)}
    assert packages == {"workers": 50.0, "shared": 30.0, "uvloop": 20.0}
    inclusive = {s.name: s.samples for s in inclusive_by_function(stacks)}
    # `<module>` is on every stack: an entry point, left out.
    assert "<module> (bridge/cli.py)" not in inclusive
    assert inclusive["handle (workers/pdfs.py)"] == 50
    assert "run (asyncio/runners.py)" not in inclusive
    lines = summary("worker pdfs", stacks, top=1)
    assert lines[0] == "worker pdfs: 100 samples"
    assert "50.0 %  store (workers/pdfs.py:104)" in lines[2]


def test_uvloop_leaf_is_named_and_counted_apart() -> None:
    stacks = parse_folded(LOOP_FOLDED)
    assert self_by_line(stacks, top=1)[0].name == UVLOOP_LEAF
    packages = {s.name: s.samples for s in self_by_package(stacks)}
    assert packages == {UVLOOP_PACKAGE: 6, "shared": 3, "json": 1}
    inclusive = {s.name: s.samples for s in inclusive_by_function(stacks)}
    # A function counts once per stack, however often it appears on it.
    assert inclusive == {"handle (workers/doshii.py)": 4, "put (shared/partners.py)": 3}


def test_threads_split_by_name() -> None:
    stacks = [
        Stack(("thread (28183): sandboxes", "spin (thr.py:4)"), 32),
        Stack(("thread (28181): MainThread", "spin (thr.py:4)"), 31),
        Stack(("thread (28190)", "idle (thr.py:9)"), 2),
        Stack(("spin (thr.py:4)",), 1),
    ]
    threads = split_threads(stacks)
    assert threads["sandboxes"] == [Stack(("spin (thr.py:4)",), 32)]
    assert threads["MainThread"][0].samples == 31
    assert threads["28190"][0].frames == ("idle (thr.py:9)",)
    assert threads[""][0].samples == 1


@pytest.mark.parametrize(
    ("file", "package"),
    [
        ("aiohttp/web_protocol.py", "aiohttp"),
        ("threading.py", "threading"),
        ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap>"),
    ],
)
def test_package_of(file: str, package: str) -> None:
    assert package_of(file) == package


def test_without_line() -> None:
    assert without_line("store (workers/pdfs.py:104)") == "store (workers/pdfs.py)"
    assert without_line("odd frame") == "odd frame"
