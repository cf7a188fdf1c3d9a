"""The benchmark's parsers: wrk's report, /proc/PID/stat, the ingress's request counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.deps import version_tuple
from bench.ingress import parse_outcomes
from bench.procstat import broker_pids, listening_inodes, parse_cpu_ticks, pids_named
from bench.report import Summary, cluster_targets, ratio_rows
from bench.wrk import WrkError, parse_wrk_output

# Captured from `wrk -t1 -c64 -d2s --latency -s post.lua` against the ingress with a bogus key.
WRK_ALL_FORBIDDEN = """\
Running 2s test @ http://127.0.0.1:18090/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    22.80ms   16.35ms 264.60ms   97.46%
    Req/Sec     3.00k   314.85     3.26k    85.00%
  Latency Distribution
     50%   20.27ms
     75%   21.19ms
     90%   26.05ms
     99%  108.18ms
  5983 requests in 2.01s, 1.33MB read
  Non-2xx or 3xx responses: 5983
Requests/sec:   2977.49
Transfer/sec:    677.50KB
"""

# Captured from the same command against bare.py, killed halfway through the run.
WRK_SERVER_KILLED = """\
Running 2s test @ http://127.0.0.1:18081/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.78ms    4.50ms  39.83ms   90.17%
    Req/Sec     6.85k     3.66k   12.96k    60.00%
  Latency Distribution
     50%    3.22ms
     75%    5.26ms
     90%    9.19ms
     99%   25.11ms
  6898 requests in 2.03s, 747.73KB read
  Socket errors: connect 0, read 32, write 27775, timeout 0
Requests/sec:   3391.58
Transfer/sec:    367.64KB
"""

# Captured with one connection against bare.py: sub-millisecond percentiles print in "us".
WRK_MICROSECONDS = """\
Running 1s test @ http://127.0.0.1:18081/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   590.85us    1.50ms  16.89ms   94.08%
    Req/Sec     4.16k     1.13k    5.63k    70.00%
  Latency Distribution
     50%  132.00us
     75%  375.00us
     90%    1.30ms
     99%    8.95ms
  4140 requests in 1.00s, 448.77KB read
Requests/sec:   4130.61
Transfer/sec:    447.75KB
"""

# /proc/PID/stat of RabbitMQ's beam.smp: utime 5948, stime 2160, cutime 0, cstime 0.
BEAM_STAT = (
    "2937 (beam.smp) S 1 2936 2936 0 -1 4194304 184974 0 1 0 5948 2160 0 0 20 0 20 0 5707 "
    "2664251392 113935 18446744073709551615 94899740430336 94899743093961 140730776499760 0 0 0 "
    "0 725127 16896 0 0 0 17 0 0 0 0 0 0 94899744078480 94899744189808 94900003069952 "
    "140730776508251 140730776508782 140730776508782 140730776510415 0\n"
)


def test_wrk_counts_non_2xx_as_not_accepted() -> None:
    result = parse_wrk_output(WRK_ALL_FORBIDDEN)
    assert result.requests == 5983
    assert result.non_2xx == 5983
    assert result.accepted == 0
    assert result.socket_errors == 0
    assert result.duration_s == pytest.approx(2.01)
    assert result.latency_p50_ms == pytest.approx(20.27)
    assert result.latency_p99_ms == pytest.approx(108.18)


def test_wrk_sums_socket_errors() -> None:
    result = parse_wrk_output(WRK_SERVER_KILLED)
    assert result.requests == 6898
    assert result.non_2xx == 0
    assert result.accepted == 6898
    assert result.socket_errors == 32 + 27775
    assert result.accepted_per_s == pytest.approx(6898 / 2.03)


def test_wrk_converts_microseconds_to_milliseconds() -> None:
    result = parse_wrk_output(WRK_MICROSECONDS)
    assert result.latency_p50_ms == pytest.approx(0.132)
    assert result.latency_p99_ms == pytest.approx(8.95)
    assert result.duration_s == pytest.approx(1.0)


def test_wrk_seconds_and_minutes() -> None:
    text = WRK_MICROSECONDS.replace("132.00us", "1.50s").replace("in 1.00s", "in 1.00m")
    result = parse_wrk_output(text)
    assert result.latency_p50_ms == pytest.approx(1500.0)
    assert result.duration_s == pytest.approx(60.0)


@pytest.mark.parametrize(
    "text",
    [
        "unable to connect to 127.0.0.1:9 Connection refused\n",
        WRK_ALL_FORBIDDEN.replace("     99%  108.18ms\n", ""),
    ],
)
def test_wrk_output_without_a_report_is_an_error(text: str) -> None:
    with pytest.raises(WrkError):
        parse_wrk_output(text)


def test_stat_sums_user_system_and_children() -> None:
    assert parse_cpu_ticks(BEAM_STAT) == 5948 + 2160


def test_stat_comm_with_spaces_and_parentheses() -> None:
    fields = BEAM_STAT.split(") ", 1)[1]
    line = f"42 (odd ) name (x)) {fields}".replace(" 0 0 20 0 20", " 7 3 20 0 20", 1)
    assert parse_cpu_ticks(line) == 5948 + 2160 + 7 + 3


def test_stat_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="stat"):
        parse_cpu_ticks("not a stat line")
    with pytest.raises(ValueError, match="too short"):
        parse_cpu_ticks("1 (x) S 1 2")


def test_pids_named_scans_comm(tmp_path: Path) -> None:
    for pid, comm in ((10, "beam.smp"), (11, "python3"), (12, "beam.smp")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(f"{comm}\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "13").mkdir()  # a process that ended: no comm file left
    assert pids_named("beam.smp", proc=tmp_path) == [10, 12]


def test_ingress_outcomes_from_metrics() -> None:
    text = (
        "# HELP bridge_ingress_requests_total Notifications received by the ingress, by outcome.\n"
        "# TYPE bridge_ingress_requests_total counter\n"
        'bridge_ingress_requests_total{outcome="accepted"} 31234.0\n'
        'bridge_ingress_requests_total{outcome="forbidden"} 2.0\n'
        'bridge_ingress_requests_created{outcome="accepted"} 1.7e+09\n'
    )
    assert parse_outcomes(text) == {"accepted": 31234, "forbidden": 2}


@pytest.mark.parametrize(
    ("version", "expected"),
    [("0.7.8", (0, 7, 8)), ("0.7.0rc1", (0, 7, 0)), ("1.0", (1, 0)), ("dev", ())],
)
def test_version_tuple(version: str, expected: tuple[int, ...]) -> None:
    assert version_tuple(version) == expected


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   9: 0100007F:1628 00000000:0000 0A 00000000:00000000 00:00000000 00000000   106        0 7697 1
  22: 0200007F:1628 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1860 1
  39: 0100007F:1628 0100007F:9A6E 01 00000000:00000000 00:00000000 00000000   106        0 1660 1
  40: 00000000:1629 00000000:0000 0A 00000000:00000000 00:00000000 00000000   106        0 5555 1
"""


def test_listening_inodes_keep_only_our_address_and_port() -> None:
    # 127.0.0.2:5672 is another node; the established connection is not a listener.
    assert listening_inodes(PROC_NET_TCP, 5672) == {7697}
    assert listening_inodes(PROC_NET_TCP, 5673) == {5555}  # 0.0.0.0 counts
    assert listening_inodes("header only\n", 5672) == set()


def test_broker_pids_pick_the_node_that_listens(tmp_path: Path) -> None:
    for pid, socket in ((10, "socket:[1860]"), (12, "socket:[7697]")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text("beam.smp\n")
        (tmp_path / str(pid) / "fd" / "3").symlink_to(socket)
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(PROC_NET_TCP)
    assert broker_pids(5672, proc=tmp_path) == [12]
    # When no beam.smp is seen listening (a broker in a container, say), every one counts.
    assert broker_pids(5999, proc=tmp_path) == [10, 12]


def _summary(server: str, accepted_per_s: float, server_cpu_us: float) -> Summary:
    return Summary(server, 1, accepted_per_s, 5.0, 10.0, server_cpu_us, 100.0, 0, 0)


def test_cluster_targets_compare_the_pair_on_the_cluster() -> None:
    summaries = [
        _summary("ingress@cluster", 3000, 120),
        _summary("naive@cluster", 1000, 300),
        _summary("ingress@cluster+tls", 2400, 150),
    ]
    passed = [t.passed for t in cluster_targets(summaries, "ingress@cluster", "naive@cluster")]
    assert passed == [True, True]
    slower = [_summary("ingress@cluster", 1900, 160), summaries[1]]
    failed = [t.passed for t in cluster_targets(slower, "ingress@cluster", "naive@cluster")]
    assert failed == [False, False]  # 1.9x throughput, 0.53x CPU
    rows = ratio_rows(summaries, [("ingress@cluster+tls", "ingress@cluster")])
    assert rows == [["ingress@cluster+tls vs ingress@cluster", "0.80x", "1.00x", "1.25x", "1.14x"]]
    assert cluster_targets(summaries[:1], "ingress@cluster", "naive@cluster") == []
