"""Driving wrk and reading its report: requests, non-2xx, socket errors, latency percentiles."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

# wrk prints times with these suffixes (format_time_us / format_time_s in its stats code).
_SECONDS_PER_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MS_PER_S = 1000.0
# wrk exits on its own after -d; anything beyond this margin means it is stuck.
WRK_EXIT_MARGIN_S = 30.0

_TIME = r"([0-9.]+)(us|ms|s|m|h)"
_REQUESTS_RE = re.compile(rf"^\s*(\d+) requests in {_TIME},", re.MULTILINE)
_PERCENTILE_RE = re.compile(rf"^\s*([0-9.]+)%\s+{_TIME}\s*$", re.MULTILINE)
_NON_2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)\s*$", re.MULTILINE)
_SOCKET_ERRORS_RE = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$", re.MULTILINE
)


class WrkError(RuntimeError):
    """wrk failed, or printed a report this parser cannot read."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: what it counted and the latency distribution of completed requests."""

    requests: int
    duration_s: float
    non_2xx: int
    socket_errors: int
    latency_p50_ms: float
    latency_p99_ms: float

    @property
    def accepted(self) -> int:
        """Requests answered 2xx (wrk's "Non-2xx or 3xx" counts every status of 400 and up)."""
        return self.requests - self.non_2xx

    @property
    def accepted_per_s(self) -> float:
        """2xx answers per second of the run."""
        return self.accepted / self.duration_s if self.duration_s > 0 else 0.0


def _seconds(number: str, unit: str) -> float:
    return float(number) * _SECONDS_PER_UNIT[unit]


def parse_wrk_output(text: str) -> WrkResult:
    """Read the report `wrk --latency` prints; raise WrkError if a required line is missing."""
    requests = _REQUESTS_RE.search(text)
    if requests is None:
        raise WrkError(f"no 'N requests in T' line in wrk's output:\n{text}")
    percentiles = {
        float(match[1]): _seconds(match[2], match[3]) for match in _PERCENTILE_RE.finditer(text)
    }
    if 50.0 not in percentiles or 99.0 not in percentiles:
        raise WrkError(f"no latency distribution (was --latency given?) in wrk's output:\n{text}")
    non_2xx = _NON_2XX_RE.search(text)
    socket_errors = _SOCKET_ERRORS_RE.search(text)
    return WrkResult(
        requests=int(requests[1]),
        duration_s=_seconds(requests[2], requests[3]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        latency_p50_ms=percentiles[50.0] * _MS_PER_S,
        latency_p99_ms=percentiles[99.0] * _MS_PER_S,
    )


def wrk_executable() -> str:
    """The wrk binary on PATH, or a WrkError that says how to get it."""
    path = shutil.which("wrk")
    if path is None:
        raise WrkError("wrk is not installed: run ./scripts/ensure-wrk.sh (apt-get install wrk)")
    return path


async def run_wrk(
    url: str, *, script: Path, keys: str, duration_s: int, connections: int, threads: int = 1
) -> WrkResult:
    """Run `wrk --latency -s script url` with BENCH_KEYS=keys and return its parsed report."""
    process = await asyncio.create_subprocess_exec(
        wrk_executable(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "-s",
        str(script),
        url,
        env={**os.environ, "BENCH_KEYS": keys},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(duration_s + WRK_EXIT_MARGIN_S):
            stdout, stderr = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    output = stdout.decode(errors="replace")
    if process.returncode != 0:
        raise WrkError(
            f"wrk exited with {process.returncode}: {stderr.decode(errors='replace')}{output}"
        )
    return parse_wrk_output(output)
