"""The pipeline benchmark's side-by-side part: medians, ratios, targets, tables, dead letters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import pipeline
from bench.pipeline_compare import (
    BASELINE,
    BRIDGE,
    NO_LEDGER,
    PEER,
    RATE,
    THROUGHPUT,
    Measured,
    comparison_targets,
    cpu_rows,
    headline_headers,
    headline_rows,
    ledger_targets,
    median,
    ratio,
    round_rows,
    summarize,
)
from bench.pipeline_stats import Figures, parse_subjects, peer_dead_letter
from bench.procstat import CLOCK_TICKS_PER_S
from bench.pyspy import Recorder, inclusive_by_function, parse_folded, summary

TOTAL = "ingress + workers"
LEDGER = "ledger: worker + PostgreSQL"
ROWS = ("ingress", TOTAL)


def _figures(
    per_s: float = 100.0,
    p50_ms: float = 10.0,
    p99_ms: float = 50.0,
    sent: int = 100,
    dead: int = 0,
    lost: int = 0,
) -> Figures:
    activated = sent - dead - lost
    return Figures(
        sent=sent,
        activated=activated,
        dead=dead,
        lost=lost,
        span_s=activated / per_s,
        p50_ms=p50_ms,
        p99_ms=p99_ms,
    )


def _round(
    subject: str,
    number: int,
    *,
    per_s: float,
    p99_ms: float,
    cpu_ms: float,
    lost: int = 0,
) -> list[Measured]:
    """One subject's round: a throughput phase and a fixed-rate phase."""
    cpu = {"ingress": cpu_ms / 4, TOTAL: cpu_ms}
    return [
        Measured(subject, number, THROUGHPUT, _figures(per_s=per_s, lost=lost), cpu),
        Measured(subject, number, RATE, _figures(p50_ms=p99_ms / 5, p99_ms=p99_ms), cpu),
    ]


def _three_rounds(bridge_cpu_ms: float = 3.0, bridge_lost: int = 0) -> list[Measured]:
    """Peer medians: 200/s, p99 80 ms, 6 ms; bridge: 320/s, p99 60 ms, `bridge_cpu_ms`."""
    runs: list[Measured] = []
    peer = [(190.0, 80.0, 6.0), (200.0, 400.0, 5.0), (210.0, 70.0, 7.0)]  # round 2 disturbed
    bridge = [(320.0, 60.0, bridge_cpu_ms), (100.0, 50.0, 9.0), (330.0, 65.0, bridge_cpu_ms)]
    for number, (p, b) in enumerate(zip(peer, bridge, strict=True), start=1):
        runs += _round(PEER, number, per_s=p[0], p99_ms=p[1], cpu_ms=p[2])
        lost = bridge_lost if number == 1 else 0
        runs += _round(BRIDGE, number, per_s=b[0], p99_ms=b[1], cpu_ms=b[2], lost=lost)
    return runs


def test_median_skips_unknowns_and_ratio_refuses_nonsense() -> None:
    assert median([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert math.isnan(median([math.nan]))
    assert ratio(3.0, 6.0) == 0.5
    for numerator, denominator in ((1.0, 0.0), (math.nan, 1.0), (1.0, math.nan)):
        assert math.isnan(ratio(numerator, denominator))


def test_summaries_are_medians_per_phase_and_counts_are_sums() -> None:
    summaries = summarize(_three_rounds(bridge_lost=2), (PEER, BRIDGE), ROWS)
    assert [s.subject for s in summaries] == [PEER, BRIDGE]
    peer, bridge = summaries
    assert peer.rounds == 3
    assert peer.per_s == pytest.approx(200.0)  # throughput phases only
    assert peer.p99_ms == pytest.approx(80.0)  # fixed-rate phases only: the 400 ms one is out
    assert peer.p50_ms == pytest.approx(16.0)
    assert peer.cpu_ms[TOTAL] == pytest.approx(6.0)
    assert peer.cpu_ms["ingress"] == pytest.approx(1.5)
    assert bridge.per_s == pytest.approx(320.0)
    assert (bridge.sent, bridge.activated, bridge.dead, bridge.lost) == (600, 598, 0, 2)
    assert bridge.counts_line() == "bridge: sent 600 = activated 598 + dead 0 + lost 2"


def test_a_subject_that_did_not_run_has_no_summary() -> None:
    runs = [m for m in _three_rounds() if m.subject == BRIDGE]
    summaries = summarize(runs, (PEER, BRIDGE), ROWS)
    assert [s.subject for s in summaries] == [BRIDGE]
    assert comparison_targets(summaries, TOTAL, 100) == []
    assert headline_headers(summaries) == ("median", BRIDGE)
    assert headline_rows(summaries, TOTAL)[0] == ["vouchers/s (closed loop)", "320.0"]


def test_targets_pass_when_the_bridge_beats_every_bound() -> None:
    targets = comparison_targets(summarize(_three_rounds(), (PEER, BRIDGE), ROWS), TOTAL, 100)
    assert [t.passed for t in targets] == [True, True, True, True]
    cpu, throughput, p99, lost = targets
    assert "0.50x (3.00 ms vs 6.00 ms)" in cpu.measured  # exactly half passes
    assert "1.60x (320.0 vs 200.0)" in throughput.measured
    assert "0.75x (60.0 ms vs 80.0 ms)" in p99.measured
    assert lost.measured == "bridge 0 lost of 600, peer 0 lost of 600"
    assert cpu.line().startswith("PASS  bridge CPU per voucher")


def test_targets_fail_on_cpu_just_over_half_and_on_any_lost() -> None:
    summaries = summarize(_three_rounds(bridge_cpu_ms=3.1, bridge_lost=1), (PEER, BRIDGE), ROWS)
    cpu, _, _, lost = comparison_targets(summaries, TOTAL, 100)
    assert not cpu.passed
    assert not lost.passed
    assert lost.line().startswith("FAIL")


def test_unknown_figures_fail_rather_than_pass() -> None:
    runs = _three_rounds()
    nothing = Measured(BRIDGE, 1, RATE, _figures(p99_ms=math.nan), {TOTAL: math.nan})
    runs = [m for m in runs if not (m.subject == BRIDGE and m.phase == RATE)] + [nothing]
    targets = comparison_targets(summarize(runs, (PEER, BRIDGE), ROWS), TOTAL, 100)
    assert not targets[2].passed
    assert "n/a" in targets[2].measured


def test_side_by_side_tables_show_ratios_bridge_over_peer() -> None:
    summaries = summarize(_three_rounds(), (PEER, BRIDGE), ROWS)
    assert headline_headers(summaries) == ("median", PEER, BRIDGE, "bridge / peer")
    rows = {row[0]: row[1:] for row in headline_rows(summaries, TOTAL)}
    assert rows["vouchers/s (closed loop)"] == ["200.0", "320.0", "1.60x"]
    assert rows["READY -> activated p99 ms (fixed rate)"] == ["80.0", "60.0", "0.75x"]
    assert rows[f"CPU ms per voucher, {TOTAL} (closed loop)"] == ["6.00", "3.00", "0.50x"]
    cpu = cpu_rows(summaries, ROWS, lambda s: s.cpu_ms)
    assert cpu == [["ingress", "1.50", "0.75", "0.50x"], [TOTAL, "6.00", "3.00", "0.50x"]]


def test_round_rows_keep_the_order_phases_ran_in() -> None:
    rows = round_rows(_three_rounds()[:2], TOTAL)
    assert [row[:3] for row in rows] == [["1", PEER, THROUGHPUT], ["1", PEER, RATE]]
    assert rows[0][-1] == "6.00"


def test_subjects_parse() -> None:
    known = (PEER, BRIDGE)
    assert parse_subjects("peer,bridge", known) == (PEER, BRIDGE)
    assert parse_subjects(" bridge ", known) == (BRIDGE,)
    for bad in ("", "bridge,bridge", "bridge,naive", ","):
        with pytest.raises(SystemExit, match="BENCH_PIPELINE_SUBJECTS"):
            parse_subjects(bad, known)


def test_peer_dead_letters_name_the_voucher_and_the_reason() -> None:
    headers: dict[str, object] = {
        "x-first-death-reason": "rejected",
        "x-first-death-queue": b"ns-peer.pdfs",
    }
    voucher_id, reason = peer_dead_letter("v-1", b"not json", headers)
    assert voucher_id == "v-1"
    assert reason == "broker dead-lettered from ns-peer.pdfs: rejected"
    # Without a correlation id, the body says whose it is: a voucher, or a Doshii update.
    assert peer_dead_letter(None, b'{"id": "v-2"}', {})[0] == "v-2"
    assert peer_dead_letter("", b'{"voucher_id": "v-3"}', {})[0] == "v-3"
    unknown = "broker dead-lettered from unknown queue: unknown"
    assert peer_dead_letter(None, b"[1]", {}) == ("", unknown)


def test_cpu_rows_total_the_subject_and_keep_the_idle_one_apart() -> None:
    ticks = {
        "ingress": 10,
        "worker pdfs": 20,
        pipeline.SANDBOXES: 5,
        pipeline.BROKER: 7,
        pipeline.IDLE: 3,
        pipeline.MACHINE: 50,
    }
    rows = pipeline.with_totals(ticks)
    assert tuple(rows) == pipeline.CPU_ROWS
    assert rows[pipeline.SUBJECT_TOTAL] == 30
    assert rows[pipeline.ALL_TOTAL] == 42
    assert rows[pipeline.IDLE] == 3
    assert rows[pipeline.OTHERS] == 5  # 50 - 42 - 3


def test_a_phase_run_becomes_cpu_ms_per_voucher_sent() -> None:
    run = pipeline.PhaseRun(
        subject=PEER,
        round_number=2,
        phase=THROUGHPUT,
        name="throughput (64 in flight)",
        traces=[],
        cpu_ticks={"ingress": CLOCK_TICKS_PER_S},  # one second
        wall_s=1.0,
        offered_per_s=None,
        refusals={},
        spooled=0,
        figures=_figures(sent=200),
    )
    assert run.label == "round 2 peer throughput (64 in flight)"
    measured = run.measured()
    assert measured.cpu_ms["ingress"] == pytest.approx(5.0)
    assert measured.cpu_ms[pipeline.SUBJECT_TOTAL] == pytest.approx(5.0)


def test_config_reads_rounds_subjects_and_the_anchors_folder(tmp_path: Path) -> None:
    anchors = tmp_path
    (anchors / pipeline.PEER_SCRIPT).write_text("")
    env = {"BENCH_ANCHORS_DIR": str(anchors), "BENCH_PIPELINE_ROUNDS": "5"}
    config = pipeline.Config.from_env(env)
    assert (config.rounds, config.subjects) == (5, (PEER, NO_LEDGER, BRIDGE))
    bridge_only = {"BENCH_PIPELINE_SUBJECTS": "bridge"}
    assert pipeline.Config.from_env(bridge_only).rounds == pipeline.DEFAULT_ROUNDS
    empty = {"BENCH_ANCHORS_DIR": str(anchors / "nowhere")}
    with pytest.raises(SystemExit, match="BENCH_ANCHORS_DIR"):
        pipeline.Config.from_env(empty)
    # The peer's script is needed only when the peer runs.
    alone = pipeline.Config.from_env({**empty, "BENCH_PIPELINE_SUBJECTS": "bridge"})
    assert alone.subjects == (BRIDGE,)


def test_the_peers_own_functions_are_ranked_in_its_profile() -> None:
    stacks = parse_folded(
        "run (asyncio/runners.py:1);handle (faststream_pipeline.py:380);"
        "pdfs (faststream_pipeline.py:320);read (aiohttp/client.py:5) 3\n"
        "run (asyncio/runners.py:1);consume (faststream/rabbit.py:9) 1\n"
    )
    inclusive = {s.name: s.samples for s in inclusive_by_function(stacks)}
    assert inclusive == {
        "handle (faststream_pipeline.py)": 3,
        "pdfs (faststream_pipeline.py)": 3,
    }


def test_bridge_is_divided_by_every_other_subject() -> None:
    runs = _three_rounds()
    runs += [
        Measured(
            BASELINE, m.round_number, m.phase, m.figures, {k: v * 2 for k, v in m.cpu_ms.items()}
        )
        for m in runs
        if m.subject == BRIDGE
    ]
    summaries = summarize(runs, (PEER, BASELINE, BRIDGE), ROWS)
    assert headline_headers(summaries) == (
        "median", PEER, BASELINE, BRIDGE, "bridge / peer", "bridge / baseline",
    )  # fmt: skip
    cpu = cpu_rows(summaries, ROWS, lambda s: s.cpu_ms)
    assert cpu[1] == [TOTAL, "6.00", "6.00", "3.00", "0.50x", "0.50x"]
    # The targets stay bridge against the peer.
    assert len(comparison_targets(summaries, TOTAL, 100)) == 4


def test_the_baseline_needs_a_checkout(tmp_path: Path) -> None:
    env = {"BENCH_PIPELINE_SUBJECTS": "baseline,bridge"}
    with pytest.raises(SystemExit, match="BENCH_PIPELINE_BASELINE"):
        pipeline.Config.from_env(env)
    (tmp_path / "bridge").mkdir()
    (tmp_path / "bridge" / "cli.py").write_text("")
    config = pipeline.Config.from_env({**env, "BENCH_PIPELINE_BASELINE": str(tmp_path)})
    assert (config.subjects, config.baseline_dir) == ((BASELINE, BRIDGE), tmp_path.resolve())
    # Named, the baseline joins the default subjects, between the peer and the bridge.
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    (anchors / pipeline.PEER_SCRIPT).write_text("")
    env = {"BENCH_PIPELINE_BASELINE": str(tmp_path), "BENCH_ANCHORS_DIR": str(anchors)}
    assert pipeline.Config.from_env(env).subjects == (PEER, BASELINE, BRIDGE)


def test_hot_spots_read_as_microseconds_per_voucher(tmp_path: Path) -> None:
    stacks = parse_folded(
        "main (bridge/cli.py:1);handle (workers/pdfs.py:9);put (shared/partners.py:5) 3\n"
        "main (bridge/cli.py:1);handle (workers/pdfs.py:9);dumps (json/__init__.py:2) 1\n"
    )
    lines = summary("worker pdfs", stacks, top=1, us_per_voucher=2000.0)
    assert lines[0] == "worker pdfs: 4 samples, 2,000 µs of CPU per voucher"
    assert lines[2] == "     75.0 %   1,500 µs  put (shared/partners.py:5)"
    assert summary("worker pdfs", stacks, top=1)[2] == "     75.0 %  put (shared/partners.py:5)"
    # The phase's CPU per voucher of the recorded process scales its shares.
    run = pipeline.PhaseRun(
        subject=BRIDGE,
        round_number=1,
        phase=THROUGHPUT,
        name="throughput",
        traces=[],
        cpu_ticks={"worker pdfs": CLOCK_TICKS_PER_S},  # one second over 500 vouchers: 2 ms
        wall_s=1.0,
        offered_per_s=None,
        refusals={},
        spooled=0,
        figures=_figures(sent=500),
    )
    recorder = Recorder("worker pdfs", 7, tmp_path / "pdfs.txt")
    lines = pipeline.profile_lines(BRIDGE, [(recorder, stacks)], run)
    assert lines[0] == "bridge worker pdfs (pid 7): 4 samples, 2,000 µs of CPU per voucher"


def _ledger_rounds(bridge_per_s: float, ledger_ms: float) -> list[Measured]:
    runs: list[Measured] = []
    for number in (1, 2, 3):
        for subject, per_s, cost in ((NO_LEDGER, 200.0, 0.0), (BRIDGE, bridge_per_s, ledger_ms)):
            cpu = {"ingress": 1.0, TOTAL: 4.0, LEDGER: cost}
            runs += [
                Measured(subject, number, THROUGHPUT, _figures(per_s=per_s), cpu),
                Measured(subject, number, RATE, _figures(), cpu),
            ]
    return runs


def test_ledger_targets_compare_with_the_bridge_without_its_ledger() -> None:
    rows = ("ingress", TOTAL, LEDGER)
    cheap = summarize(_ledger_rounds(180.0, 0.4), (NO_LEDGER, BRIDGE), rows)
    assert [t.passed for t in ledger_targets(cheap, LEDGER)] == [True, True]  # 10 % fewer
    dear = summarize(_ledger_rounds(160.0, 0.6), (NO_LEDGER, BRIDGE), rows)
    passed = ledger_targets(dear, LEDGER)
    assert [t.passed for t in passed] == [False, False]  # 0.6 ms, 20 % fewer
    assert "20.0 % fewer" in passed[1].measured
    assert ledger_targets(summarize(_three_rounds(), (PEER, BRIDGE), ROWS), LEDGER) == []
