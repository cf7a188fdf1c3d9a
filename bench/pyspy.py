"""py-spy profiles of the benchmark's processes: record folded stacks, then rank the hot spots.

`py-spy record --format raw` writes one line per distinct stack, `frame;frame;...;leaf COUNT`,
each frame `function (file:line)` with the file shortened to its package path. With `--threads`
the root frame is `thread (TID): name`. Recording uses `--gil`: a sample is kept only for the
thread holding the GIL, so samples stand for CPU time in the interpreter and in C code that keeps
the GIL (uvloop, pydantic-core, orjson); without it, an executor thread blocked in
`work_queue.get` counts as busy. A leaf `Runner.run (asyncio/runners.py:...)` is time inside
uvloop's C loop (epoll, socket reads and writes, callback dispatch): it is named so.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.servers import end_process

SAMPLE_RATE_HZ = 200
# py-spy writes its file when interrupted; a big profile takes a moment to symbolize.
STOP_TIMEOUT_S = 30.0
TOP_SPOTS = 8
PERCENT = 100.0
PROJECT_PACKAGES = frozenset({"ingress", "workers", "shared", "sandbox", "bench"})
# The pipeline benchmark's FastStream peer is one module; its functions are ranked like ours.
PEER_MODULES = frozenset({"faststream_pipeline"})
# A project function on at least this share of the samples is an entry point (main, run, the
# thread's target): on every stack, so it says nothing about where the time goes.
ENTRY_SHARE_PERCENT = 95.0
UVLOOP_LEAF = "uvloop's C event loop: epoll, socket I/O, callback dispatch (under Runner.run)"
UVLOOP_PACKAGE = "uvloop (C loop)"
_LOOP_RUNNER = "Runner.run (asyncio/runners.py)"

_FRAME_RE = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD_RE = re.compile(r"^thread \((?P<tid>\d+)\)(?:: (?P<name>.*))?$")


@dataclass(frozen=True)
class Stack:
    """One distinct call stack, root first, and how many samples caught it."""

    frames: tuple[str, ...]
    samples: int


@dataclass(frozen=True)
class HotSpot:
    """A frame, function or package, and its share of a profile's samples."""

    name: str
    samples: int
    percent: float

    def line(self, us_per_voucher: float | None = None) -> str:
        """`  12.3 %  name`; with the process's CPU µs per voucher, `  12.3 %    45 µs  name`."""
        if us_per_voucher is None or math.isnan(us_per_voucher):
            return f"{self.percent:5.1f} %  {self.name}"
        share_us = us_per_voucher * self.percent / PERCENT
        return f"{self.percent:5.1f} %  {share_us:6,.0f} µs  {self.name}"


def parse_folded(text: str) -> list[Stack]:
    """The stacks of a py-spy raw (folded) profile; ValueError on a line that is not one."""
    stacks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            raise ValueError(f"not a folded stack line: {line!r}")
        stacks.append(Stack(tuple(stack.split(";")), int(count)))
    return stacks


def split_threads(stacks: Iterable[Stack]) -> dict[str, list[Stack]]:
    """Stacks recorded with `--threads`, by thread name (or TID), the thread frame removed."""
    threads: dict[str, list[Stack]] = {}
    for stack in stacks:
        match = _THREAD_RE.match(stack.frames[0]) if stack.frames else None
        if match is None:
            threads.setdefault("", []).append(stack)
            continue
        name = match["name"] or match["tid"]
        threads.setdefault(name, []).append(Stack(stack.frames[1:], stack.samples))
    return threads


def frame_file(frame: str) -> str:
    """The file of `function (file:line)`; the whole frame when it is not one."""
    match = _FRAME_RE.match(frame)
    return match["file"] if match else frame


def without_line(frame: str) -> str:
    """`function (file:line)` as `function (file)`: every line of a function together."""
    match = _FRAME_RE.match(frame)
    return f"{match['function']} ({match['file']})" if match else frame


def package_of(file: str) -> str:
    """The package (first path part) or top-level module of a shortened py-spy file name."""
    if file.startswith("<"):
        return file
    head, _, rest = file.partition("/")
    if rest:
        return head
    return head.removesuffix(".py")


def leaf_name(frame: str) -> str:
    """The frame as the hot-spot lists show it: uvloop's C loop gets its own name."""
    return UVLOOP_LEAF if without_line(frame) == _LOOP_RUNNER else frame


def leaf_package(frame: str) -> str:
    """The package a leaf frame's time belongs to (uvloop's C loop apart from asyncio)."""
    if without_line(frame) == _LOOP_RUNNER:
        return UVLOOP_PACKAGE
    return package_of(frame_file(frame))


def _rank(counts: Mapping[str, int], total: int, top: int) -> list[HotSpot]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [HotSpot(name, n, n * PERCENT / total if total else 0.0) for name, n in ranked]


def total_samples(stacks: Iterable[Stack]) -> int:
    """Every sample of the profile."""
    return sum(stack.samples for stack in stacks)


def self_by_line(stacks: Sequence[Stack], top: int = TOP_SPOTS) -> list[HotSpot]:
    """Leaf frames (the line running, C calls included) by their share of all samples."""
    counts: Counter[str] = Counter()
    for stack in stacks:
        if stack.frames:
            counts[leaf_name(stack.frames[-1])] += stack.samples
    return _rank(counts, total_samples(stacks), top)


def self_by_package(stacks: Sequence[Stack], top: int = TOP_SPOTS) -> list[HotSpot]:
    """Leaf frames grouped by package (aiohttp, asyncio, pydantic, shared, ...)."""
    counts: Counter[str] = Counter()
    for stack in stacks:
        if stack.frames:
            counts[leaf_package(stack.frames[-1])] += stack.samples
    return _rank(counts, total_samples(stacks), top)


def is_project_frame(frame: str) -> bool:
    """Whether the frame is in the project's own code, or in the peer's module."""
    package = package_of(frame_file(frame))
    return package in PROJECT_PACKAGES or package in PEER_MODULES


def inclusive_by_function(
    stacks: Sequence[Stack],
    top: int = TOP_SPOTS,
    keep: Callable[[str], bool] = is_project_frame,
) -> list[HotSpot]:
    """Functions kept by `keep`, each with every sample it is anywhere on the stack of.

    Entry points (on ENTRY_SHARE_PERCENT of the samples or more) are left out.
    """
    counts: Counter[str] = Counter()
    for stack in stacks:
        for function in {without_line(frame) for frame in stack.frames if keep(frame)}:
            counts[function] += stack.samples
    total = total_samples(stacks)
    busy = {f: n for f, n in counts.items() if n * PERCENT < ENTRY_SHARE_PERCENT * total}
    return _rank(busy, total, top)


def summary(
    title: str,
    stacks: Sequence[Stack],
    top: int = TOP_SPOTS,
    us_per_voucher: float | None = None,
) -> list[str]:
    """Lines for one profile: self time by line and by package, project functions inclusive.

    With the process's CPU µs per voucher over the same window, each share is also shown as
    µs per voucher (samples are taken in proportion to CPU time, `--gil`).
    """
    known = us_per_voucher is not None and not math.isnan(us_per_voucher)
    per_voucher = f", {us_per_voucher:,.0f} µs of CPU per voucher" if known else ""
    lines = [f"{title}: {total_samples(stacks):,} samples{per_voucher}"]
    sections = (
        ("self, by line", self_by_line(stacks, top)),
        ("self, by package", self_by_package(stacks, top)),
        ("inclusive, project functions", inclusive_by_function(stacks, top)),
    )
    for heading, spots in sections:
        lines.append(f"  {heading}:")
        lines.extend(f"    {spot.line(us_per_voucher)}" for spot in spots)
    return lines


def executable() -> str | None:
    """py-spy next to this interpreter, or on PATH; None when there is none."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


class Recorder:
    """`py-spy record` of one process into a raw file, until `stop()`."""

    def __init__(self, name: str, pid: int, output: Path, *, threads: bool = False) -> None:
        self.name = name
        self.pid = pid
        self.output = output
        self.threads = threads
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, py_spy: str) -> None:
        """Attach py-spy to the process."""
        argv = [py_spy, "record", "--format", "raw", "--gil", "--rate", str(SAMPLE_RATE_HZ)]
        argv += ["--pid", str(self.pid), "--output", str(self.output)]
        if self.threads:
            argv.append("--threads")
        self._process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

    async def stop(self) -> list[Stack]:
        """Interrupt py-spy (it then writes its file) and read the stacks; [] if there are none."""
        process = self._process
        if process is None:
            return []
        await end_process(process, signal.SIGINT, STOP_TIMEOUT_S)
        try:
            return parse_folded(self.output.read_text())
        except (OSError, ValueError):
            return []
