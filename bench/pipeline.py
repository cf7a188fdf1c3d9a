"""The pipeline benchmark: vouchers through the ingress, the broker, every worker and the sandboxes.

Each piece is its own OS process, as in production: `bridge ingress`, `bridge worker
reservations`, `bridge worker pdfs`, `bridge worker lifecycle`, `bridge worker doshii`, RabbitMQ's
`beam.smp`, and this process, the load driver. The driver hosts both sandboxes in a thread of
their own (their own event loop, so their CPU is read apart from the driver's) and plays Jackpot
and the POS: for each voucher it opens a Doshii request, mints the key, reserves a Jackpot voucher,
POSTs RESERVED to the ingress, waits until the reservations worker confirmed at the Jackpot
sandbox, marks the voucher READY and POSTs READY with a fresh signed link, then waits until the
Doshii request is activated (what `JackpotSandbox.deliver` does, with the driver's own client).

Phases: a short warm-up (discarded); throughput, closed loop with a bounded number of vouchers in
flight; latency, open loop at a fixed offered rate. Per phase: vouchers/s from the first RESERVED
sent to the last activation, READY-accepted -> activated p50/p99, CPU per voucher per process from
/proc, and sent = activated + dead + lost with dead letters read from the namespace's dead queue.
Results go to stdout and to bench/results/pipeline-latest.md.

With BENCH_PIPELINE_PYSPY=DIR, py-spy records the bridge processes and the driver during the
throughput phase (raw profiles kept in DIR) and the hot spots are printed; such a run's figures
are perturbed by the sampling, so it leaves the results file as it was.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika.exceptions
import aiohttp
import orjson
import uvloop

from bench import procstat, pyspy, report, servers
from bench.broker import BrokerAdmin
from bench.machine import Machine, describe
from bench.pipeline_stats import (
    Figures,
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
    positive_int,
)
from bench.report import Target
from bench.sandbox_thread import THREAD_NAME, SandboxThread
from bench.servers import Probe, Server
from ingress.app import NOTIFICATION_PATH
from sandbox.doshii import DoshiiSandbox, Status
from sandbox.jackpot import JackpotSandbox, State
from sandbox.server import Sandboxes
from shared.keys import KeyRing
from shared.models import KeyClaims, value_to_cents
from shared.settings import ENV_PREFIX, Settings, load_settings
from workers import dlq

REPO = Path(__file__).resolve().parents[1]
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "pipeline-latest.md"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOOPBACK = "127.0.0.1"
NAMESPACE_PREFIX = "bench-pipe-"
NAMESPACE_RANDOM_BYTES = 4
WORKER_ROLES = ("reservations", "pdfs", "lifecycle", "doshii")

DEFAULT_VOUCHERS = 3000
DEFAULT_IN_FLIGHT = 64
DEFAULT_RATE_PER_S = 100
DEFAULT_RATE_DURATION_S = 15
DEFAULT_WARMUP_VOUCHERS = 200

# Jackpot value of every voucher, in currency units; its Doshii request asks for the same.
VOUCHER_VALUE = Decimal(110)
# A confirm or an activation may wait behind a backlog; only a stuck voucher takes this long.
STEP_TIMEOUT_S = 120.0
# Like Jackpot, a notification answered other than 200 is sent again, this often, this long.
NOTIFY_RETRY_S = 0.2
NOTIFY_RETRY_WINDOW_S = 60.0
NOTIFY_TIMEOUT_S = 30.0
# Keep-alive connections from the driver to the ingress.
DRIVER_CONNECTIONS = 256
JSON_HEADERS = {"Content-Type": "application/json"}
SPOOLED_MARK = b'"status":"spooled"'
# Two busy event loops share this process's GIL: hand it over after 1 ms, not Python's 5 ms.
SWITCH_INTERVAL_S = 0.001
PROGRESS_INTERVAL_S = 2.0
# After a phase: acks of the last updates land, the broker goes quiet.
SETTLE_S = 1.0

TARGET_MIN_VOUCHERS_PER_S = 300.0
TARGET_MAX_P99_MS = 250.0

EXIT_LOST = 1
EXIT_SETUP_FAILED = 2
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

INGRESS = "ingress"
SANDBOXES = "sandboxes (driver thread)"
DRIVER = "load driver"
BROKER = "broker (beam.smp)"
BRIDGE_TOTAL = "bridge (ingress + workers)"
ALL_TOTAL = "everything above"
MACHINE = "machine, all CPUs"
OTHERS = "rest of the machine (not ours)"
WORKERS = tuple(f"worker {role}" for role in WORKER_ROLES)
PROCESS_ORDER = (INGRESS, *WORKERS, SANDBOXES, DRIVER, BROKER)
# What py-spy records when asked: every busy bridge process (lifecycle idles here) and the driver.
PROFILED = (INGRESS, "worker reservations", "worker pdfs", "worker doshii")
DRIVER_THREADS = {"MainThread": DRIVER, THREAD_NAME: SANDBOXES}
_AFTER_RESERVED = tuple(state.value for state in State if state is not State.RESERVED)


class PipelineError(Exception):
    """The benchmark cannot go on (a process died, the setup failed); the message says why."""


@dataclass(frozen=True)
class Config:
    """The knobs, from BENCH_PIPELINE_* environment variables."""

    vouchers: int
    in_flight: int
    rate_per_s: int
    rate_duration_s: int
    warmup: int
    pyspy_dir: Path | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """BENCH_PIPELINE_VOUCHERS, _IN_FLIGHT, _RATE, _RATE_S, _WARMUP, _PYSPY; exit if bad."""
        pyspy_dir = env.get("BENCH_PIPELINE_PYSPY", "").strip()
        return cls(
            vouchers=positive_int(env, "BENCH_PIPELINE_VOUCHERS", DEFAULT_VOUCHERS),
            in_flight=positive_int(env, "BENCH_PIPELINE_IN_FLIGHT", DEFAULT_IN_FLIGHT),
            rate_per_s=positive_int(env, "BENCH_PIPELINE_RATE", DEFAULT_RATE_PER_S),
            rate_duration_s=positive_int(env, "BENCH_PIPELINE_RATE_S", DEFAULT_RATE_DURATION_S),
            warmup=non_negative_int(env, "BENCH_PIPELINE_WARMUP", DEFAULT_WARMUP_VOUCHERS),
            pyspy_dir=Path(pyspy_dir).resolve() if pyspy_dir else None,
        )

    @property
    def rate_vouchers(self) -> int:
        """How many vouchers the fixed-rate phase starts."""
        return self.rate_per_s * self.rate_duration_s

    @property
    def throughput_name(self) -> str:
        """The throughput phase's name in the tables."""
        return f"throughput ({self.in_flight} in flight)"

    @property
    def rate_name(self) -> str:
        """The fixed-rate phase's name in the tables."""
        return f"{self.rate_per_s}/s offered ({self.rate_duration_s} s)"


@dataclass
class PhaseRun:
    """One measured phase: its vouchers, the CPU used meanwhile, and what came of it."""

    name: str
    traces: list[Trace]
    cpu_ticks: dict[str, int]
    wall_s: float
    offered_per_s: float | None  # the open loop's achieved start rate; None for a closed loop
    refusals: dict[int, int]
    spooled: int
    profile: list[str] = field(default_factory=list)  # py-spy hot spots, when recorded
    figures: Figures | None = None

    @property
    def result(self) -> Figures:
        """The phase's figures (set once its dead letters were read)."""
        if self.figures is None:
            raise RuntimeError(f"phase {self.name} has no figures yet")
        return self.figures


# Run on the sandboxes' loop: their waiters are asyncio.Events of that loop.


async def _confirm_then_ready(
    jackpot: JackpotSandbox, voucher_id: str
) -> tuple[str, dict[str, Any] | None]:
    """Wait until the bridge confirmed; then READY, and the READY notification's JSON."""
    state = await jackpot.wait_for_state(voucher_id, *_AFTER_RESERVED, timeout_s=STEP_TIMEOUT_S)
    if state != State.CONFIRMED:
        return state, None
    jackpot.set_state(voucher_id, State.READY)
    return state, jackpot.notification(voucher_id)


async def _final_status(doshii: DoshiiSandbox, request_id: str) -> tuple[str, str]:
    """Wait until the Doshii request is final; its status and when it last changed (ISO)."""
    final = (Status.ACTIVATED.value, Status.CANCELLED.value)
    status = await doshii.wait_for_status(request_id, *final, timeout_s=STEP_TIMEOUT_S)
    return status, str(doshii.requests[request_id]["updatedAt"])


@dataclass
class Driver:
    """Plays Jackpot and the POS: each `play()` takes one voucher from reservation to activation.

    Opening requests and reserving vouchers is plain dict bookkeeping on the sandboxes, done from
    this thread; whatever waits for or wakes a sandbox waiter runs on the sandboxes' own loop.
    """

    sandboxes: Sandboxes
    thread: SandboxThread
    keys: KeyRing
    session: aiohttp.ClientSession
    notification_url: str
    amount_cents: int
    traces: list[Trace] = field(default_factory=list)
    refusals: collections.Counter[int] = field(default_factory=collections.Counter)
    spooled: int = 0

    def begin_phase(self) -> list[Trace]:
        """Start counting afresh; returns the list the phase's traces go to."""
        self.traces = []
        self.refusals = collections.Counter()
        self.spooled = 0
        return self.traces

    async def play(self) -> None:
        """One voucher, RESERVED to activated; how it went is appended to `traces`."""
        doshii, jackpot = self.sandboxes.doshii, self.sandboxes.jackpot
        request_id = doshii.create_request(amount_cents=self.amount_cents)
        claims = KeyClaims(
            location_id=doshii.locations[request_id],
            request_id=request_id,
            amount_cents=self.amount_cents,
        )
        voucher = jackpot.reserve(
            notification_url=self.notification_url,
            notification_key=self.keys.mint(claims),
            value=VOUCHER_VALUE,
        )
        voucher_id = str(voucher["id"])
        target = jackpot.notification_url(voucher_id)
        reserved = jackpot.notification(voucher_id, State.RESERVED)
        trace = Trace(voucher_id=voucher_id, request_id=request_id, reserved_sent_s=time.time())
        self.traces.append(trace)
        try:
            if not await self._notify(target, reserved):
                trace.failure = "RESERVED never answered 200"
                return
            state, ready = await self.thread.run(_confirm_then_ready(jackpot, voucher_id))
            if ready is None:
                trace.failure = f"not confirmed: the Jackpot voucher is {state}"
                return
            if not await self._notify(target, ready):
                trace.failure = "READY never answered 200"
                return
            trace.ready_accepted_s = time.time()
            status, updated_at = await self.thread.run(_final_status(doshii, request_id))
            if status == Status.ACTIVATED:
                trace.activated_s = epoch_s(updated_at)
            else:
                trace.failure = f"the Doshii request is {status}"
        except TimeoutError:
            waited = "confirm" if trace.ready_accepted_s is None else "activation"
            trace.failure = f"no {waited} within {STEP_TIMEOUT_S:.0f} s"

    async def _notify(self, url: str, payload: Mapping[str, Any]) -> bool:
        """POST a notification until it is answered 200, like Jackpot; False if it never was."""
        body = orjson.dumps(payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NOTIFY_RETRY_WINDOW_S
        while True:
            try:
                async with self.session.post(url, data=body, headers=JSON_HEADERS) as response:
                    answer = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status, answer = 0, b""
            if status == 200:
                if SPOOLED_MARK in answer:
                    self.spooled += 1
                return True
            self.refusals[status] += 1
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(NOTIFY_RETRY_S)


async def closed_loop(driver: Driver, count: int, in_flight: int) -> None:
    """`count` vouchers, never more than `in_flight` of them between RESERVED and activated."""
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await driver.play()

    await asyncio.gather(*(one() for _ in range(count)))


async def open_loop(driver: Driver, count: int, rate_per_s: int) -> float:
    """Start a voucher every 1/rate s whatever the others do; returns the achieved start rate."""
    loop = asyncio.get_running_loop()
    interval_s = 1.0 / rate_per_s
    started = loop.time()
    tasks = []
    for index in range(count):
        delay_s = started + index * interval_s - loop.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(driver.play()))
    last_start = loop.time()
    await asyncio.gather(*tasks)
    return (count - 1) / (last_start - started) if count > 1 and last_start > started else 0.0


def bridge_argv(*args: str) -> list[str]:
    """The `bridge` command of this venv (or `python -m bridge`) with `args`."""
    bridge = Path(sys.executable).parent / "bridge"
    if bridge.is_file():
        return [str(bridge), *args]
    return [sys.executable, "-m", "bridge", *args]


def bridge_values(
    namespace: str, sandboxes: Sandboxes, workdir: Path, ingress_port: int
) -> dict[str, str]:
    """Settings shared by every bridge process (by field name); the rest are defaults."""
    return {
        **sandboxes.settings_overrides(),
        "amqp_url": AMQP_URL,
        "namespace": namespace,
        "key_secrets": secrets.token_urlsafe(32),
        "http_host": LOOPBACK,
        "http_port": str(ingress_port),
        "pdf_dir": str(workdir / "pdfs"),
        "spool_dir": str(workdir / "spool"),
        # As in production: info-level JSON logs (to a file each here); metrics are always on.
        "log_level": "info",
        "log_json": "true",
    }


def as_env(values: Mapping[str, str]) -> dict[str, str]:
    """`{"http_port": "1"}` as `{"BRIDGE_HTTP_PORT": "1"}`."""
    return {f"{ENV_PREFIX}{name.upper()}": value for name, value in values.items()}


def own_cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (all its threads) or of one of its threads, in clock ticks."""
    path = procstat.PROC / str(pid) / "stat"
    if tid is not None:
        path = procstat.PROC / str(pid) / "task" / str(tid) / "stat"
    return parse_own_cpu_ticks(path.read_text())


class PipelineBench:
    """The processes, the driver, and the measurements of one benchmark run."""

    def __init__(
        self,
        config: Config,
        workdir: Path,
        sandboxes: Sandboxes,
        thread: SandboxThread,
        admin: BrokerAdmin,
    ) -> None:
        self.config = config
        self.thread = thread
        self.sandboxes = sandboxes
        self.admin = admin
        self.namespace = f"{NAMESPACE_PREFIX}{secrets.token_hex(NAMESPACE_RANDOM_BYTES)}"
        ingress_port = servers.free_port()
        self.values = bridge_values(self.namespace, sandboxes, workdir, ingress_port)
        self.settings = load_settings(**self.values)
        base_env = {**os.environ, **as_env(self.values)}
        self.servers = [
            Server(
                name=INGRESS,
                argv=bridge_argv("ingress"),
                env=base_env,
                port=ingress_port,
                log_path=workdir / "ingress.log",
                probe=Probe.READYZ,
                cwd=REPO,
            )
        ]
        for role, name in zip(WORKER_ROLES, WORKERS, strict=True):
            port = servers.free_port()
            self.servers.append(
                Server(
                    name=name,
                    argv=bridge_argv("worker", role),
                    env={**base_env, **as_env({"worker_http_port": str(port)})},
                    port=port,
                    log_path=workdir / f"worker-{role}.log",
                    probe=Probe.READYZ,
                    cwd=REPO,
                )
            )
        self.broker_pids = procstat.pids_named(procstat.BROKER_COMM)
        self.ingress_url = f"http://{LOOPBACK}:{ingress_port}{NOTIFICATION_PATH}"

    async def start(self, stack: AsyncExitStack) -> None:
        """Start every bridge process (each stopped by `stack`), then wait until all are ready."""
        stack.push_async_callback(
            self.admin.delete_namespace, self.namespace, tiers_s=self.settings.retry_tiers_s
        )
        for server in self.servers:
            stack.push_async_callback(servers.stop, server)
            await servers.start(server)
        try:
            await asyncio.gather(*(servers.wait_ready(server) for server in self.servers))
        except RuntimeError as error:  # wait_ready's word for "exited" or "not ready in time"
            raise PipelineError(str(error)) from error

    def pids_line(self) -> str:
        """Which process is which, for attaching a profiler."""
        parts = [f"{server.name} {server.pid}" for server in self.servers]
        parts.append(f"{DRIVER} {os.getpid()} (sandbox thread {self.thread.native_id})")
        parts.append(f"broker {','.join(map(str, self.broker_pids)) or 'not found'}")
        return "pids: " + "; ".join(parts)

    def check_alive(self) -> None:
        """Raise if a bridge process has exited, with the end of its log."""
        for server in self.servers:
            process = server.process
            if process is None or process.returncode is not None:
                code = None if process is None else process.returncode
                raise PipelineError(
                    f"{server.name} exited (status {code}) during the run:\n{server.log_tail()}"
                )

    def cpu_snapshot(self) -> dict[str, int]:
        """CPU ticks used so far by every process, the sandbox thread and the driver apart."""
        try:
            ticks = {server.name: procstat.cpu_ticks(server.pid) for server in self.servers}
        except OSError as error:
            self.check_alive()
            raise PipelineError(f"cannot read a bridge process's CPU: {error}") from error
        pid = os.getpid()
        sandbox = own_cpu_ticks(pid, self.thread.native_id)
        ticks[SANDBOXES] = sandbox
        ticks[DRIVER] = own_cpu_ticks(pid) - sandbox
        ticks[BROKER] = procstat.total_cpu_ticks(self.broker_pids)
        ticks[MACHINE] = parse_machine_busy_ticks((procstat.PROC / "stat").read_text())
        return ticks

    async def _progress(self, name: str, traces: Sequence[Trace], started: float) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            self.check_alive()
            ready = sum(t.ready_accepted_s is not None for t in traces)
            activated = sum(t.activated for t in traces)
            failed = sum(t.failure is not None for t in traces)
            print(
                f"  {name}: {time.monotonic() - started:5.1f} s  sent {len(traces):,}  "
                f"READY accepted {ready:,}  activated {activated:,}  failed {failed:,}",
                flush=True,
            )

    async def _start_profiles(self, directory: Path) -> list[pyspy.Recorder]:
        py_spy = pyspy.executable()
        if py_spy is None:
            raise PipelineError("BENCH_PIPELINE_PYSPY is set, but py-spy is not installed")
        recorders = [
            pyspy.Recorder(s.name, s.pid, directory / f"{s.name.replace(' ', '-')}.txt")
            for s in self.servers
            if s.name in PROFILED
        ]
        recorders.append(
            pyspy.Recorder(DRIVER, os.getpid(), directory / "driver.txt", threads=True)
        )
        for recorder in recorders:
            await recorder.start(py_spy)
        return recorders

    @staticmethod
    async def _stop_profiles(recorders: Sequence[pyspy.Recorder]) -> list[str]:
        profiles = await asyncio.gather(*(recorder.stop() for recorder in recorders))
        lines: list[str] = []
        for recorder, stacks in zip(recorders, profiles, strict=True):
            if not recorder.threads:
                lines += pyspy.summary(f"{recorder.name} (pid {recorder.pid})", stacks)
                continue
            for thread, part in pyspy.split_threads(stacks).items():
                name = DRIVER_THREADS.get(thread, f"{recorder.name}, thread {thread}")
                lines += pyspy.summary(f"{name} (pid {recorder.pid})", part)
        return lines

    async def measure(
        self,
        driver: Driver,
        name: str,
        load: Callable[[], Awaitable[float | None]],
        profile_dir: Path | None = None,
    ) -> PhaseRun:
        """Run one phase's load with CPU read around it and progress shown; then settle.

        With `profile_dir`, py-spy records the busy processes meanwhile (raw files go there).
        """
        traces = driver.begin_phase()
        recorders = await self._start_profiles(profile_dir) if profile_dir is not None else []
        before = self.cpu_snapshot()
        started = time.monotonic()
        loading = asyncio.ensure_future(load())
        progress = asyncio.ensure_future(self._progress(name, traces, started))
        try:
            await asyncio.wait({loading, progress}, return_when=asyncio.FIRST_COMPLETED)
            if progress.done():
                progress.result()  # a bridge process died: raise its story
            offered = await loading
        finally:
            for task in (loading, progress):
                task.cancel()
            await asyncio.gather(loading, progress, return_exceptions=True)
        wall_s = time.monotonic() - started
        run = PhaseRun(
            name=name,
            traces=traces,
            cpu_ticks=cpu_deltas(before, self.cpu_snapshot()),
            wall_s=wall_s,
            offered_per_s=offered,
            refusals=dict(driver.refusals),
            spooled=driver.spooled,
        )
        if recorders:
            run.profile = await self._stop_profiles(recorders)
        await asyncio.sleep(SETTLE_S)
        return run

    async def dead_voucher_ids(self) -> set[str]:
        """Voucher ids of every dead letter in the namespace (the letters stay where they are)."""
        try:
            letters = await dlq.list_dead(self.settings)
        except (aio_pika.exceptions.AMQPError, OSError) as error:
            raise PipelineError(f"cannot read the dead queue: {error}") from error
        for letter in letters:
            print(f"  dead letter {letter.message_id}: {letter.reason}", flush=True)
        return {letter.voucher_id for letter in letters}


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


PHASE_HEADERS = ("phase", "vouchers", "vouchers/s", "p50 ms", "p99 ms", "lost", "dead")


def phase_rows(runs: Sequence[PhaseRun]) -> list[list[str]]:
    """Cells for PHASE_HEADERS, one row per measured phase."""
    return [
        [
            run.name,
            f"{run.result.sent:,}",
            _fmt(run.result.per_s, 1),
            _fmt(run.result.p50_ms, 1),
            _fmt(run.result.p99_ms, 1),
            f"{run.result.lost:,}",
            f"{run.result.dead:,}",
        ]
        for run in runs
    ]


def _with_totals(ticks: Mapping[str, int]) -> dict[str, int]:
    rows = {name: ticks.get(name, 0) for name in PROCESS_ORDER}
    rows[BRIDGE_TOTAL] = sum(rows[name] for name in (INGRESS, *WORKERS))
    rows[ALL_TOTAL] = sum(ticks.get(name, 0) for name in PROCESS_ORDER)
    rows[OTHERS] = max(ticks.get(MACHINE, 0) - rows[ALL_TOTAL], 0)
    return rows


def cpu_rows(runs: Sequence[PhaseRun], cell: Callable[[PhaseRun, int], str]) -> list[list[str]]:
    """One row per process (then the totals), one column per phase, each cell `cell(run, ticks)`."""
    tables = [_with_totals(run.cpu_ticks) for run in runs]
    return [
        [name, *(cell(run, t[name]) for run, t in zip(runs, tables, strict=True))]
        for name in tables[0]
    ]


def per_voucher_cell(run: PhaseRun, ticks: int) -> str:
    """CPU ms per voucher sent in the phase."""
    return _fmt(cpu_ms_per_voucher(ticks, run.result.sent), 2)


def busy_cell(run: PhaseRun, ticks: int) -> str:
    """CPU over the phase's wall time, in % of one core."""
    return _fmt(core_percent(ticks, run.wall_s), 0)


def evaluate_targets(throughput: PhaseRun, rate: PhaseRun, config: Config) -> list[Target]:
    """Sustained vouchers/s, p99 at the fixed rate, and nothing lost (nor dead) anywhere."""
    lost = throughput.result.lost + rate.result.lost
    dead = throughput.result.dead + rate.result.dead
    sent = throughput.result.sent + rate.result.sent
    per_s, p99 = throughput.result.per_s, rate.result.p99_ms
    return [
        Target(
            f"sustained >= {TARGET_MIN_VOUCHERS_PER_S:.0f} vouchers/s ({throughput.name})",
            f"{_fmt(per_s, 1)} vouchers/s",
            per_s >= TARGET_MIN_VOUCHERS_PER_S,
        ),
        Target(
            f"p99 READY accepted -> activated <= {TARGET_MAX_P99_MS:.0f} ms at "
            f"{config.rate_per_s} vouchers/s offered",
            f"{_fmt(p99, 1)} ms (p50 {_fmt(rate.result.p50_ms, 1)} ms, "
            f"{_fmt(rate.result.per_s, 1)} vouchers/s achieved)",
            p99 <= TARGET_MAX_P99_MS,
        ),
        Target(
            "zero lost (sent = activated + dead, dead expected 0)",
            f"{lost:,} lost, {dead:,} dead of {sent:,} sent",
            lost == 0,
        ),
    ]


def ceiling_lines(runs: Sequence[PhaseRun], cores: int) -> list[str]:
    """What the CPU cost per voucher allows on this machine's cores, whoever else is on them."""
    lines = []
    for run in runs:
        totals = _with_totals(run.cpu_ticks)
        everything = cpu_ms_per_voucher(totals[ALL_TOTAL], run.result.sent)
        bridge = cpu_ms_per_voucher(totals[BRIDGE_TOTAL], run.result.sent)
        lines.append(
            f"{run.name}: {cores} CPUs x 1000 ms / {_fmt(everything, 2)} ms per voucher = "
            f"{_fmt(ceiling_per_s(everything, cores), 0)} vouchers/s with the whole machine "
            f"ours; the bridge processes alone ({_fmt(bridge, 2)} ms) would allow "
            f"{_fmt(ceiling_per_s(bridge, cores), 0)} vouchers/s"
        )
    return lines


def phase_notes(runs: Sequence[PhaseRun]) -> list[str]:
    """One line per phase on timing and the driver's view: retries, spooled, failures."""
    lines = []
    for run in runs:
        figures_ = run.result
        offered = (
            "" if run.offered_per_s is None else f"; started {run.offered_per_s:.1f} vouchers/s"
        )
        refused = ", ".join(f"{s or 'no answer'} x{n}" for s, n in sorted(run.refusals.items()))
        failures = ", ".join(f"{why} x{n}" for why, n in failure_counts(run.traces).items())
        lines.append(
            f"{run.name}: first RESERVED -> last activation {_fmt(figures_.span_s, 2)} s, "
            f"CPU window {run.wall_s:.2f} s{offered}; activated {figures_.activated:,}; "
            f"ingress answers other than 200: {refused or 'none'}; spooled {run.spooled}; "
            f"driver-side failures: {failures or 'none'}"
        )
    return lines


def settings_line(settings: Settings) -> str:
    """The bridge settings that shape the run (defaults unless BRIDGE_* says otherwise)."""
    tiers = ",".join(map(str, settings.retry_tiers_s))
    return (
        f"bridge settings: prefetch {settings.prefetch}, concurrency {settings.concurrency} "
        f"(per worker process), log level {settings.log_level} (JSON, to a file per process), "
        f"metrics on, confirm mode {settings.jackpot_confirm}, retry tiers {tiers} s, "
        f"quick retries {settings.quick_retries}"
    )


def load_line(config: Config) -> str:
    """What the driver offers, phase by phase."""
    return (
        f"warm-up {config.warmup:,} vouchers (discarded); "
        f"throughput: {config.vouchers:,} vouchers, at most {config.in_flight} in flight "
        f"(closed loop); latency: one voucher every "
        f"{1000 / config.rate_per_s:g} ms for {config.rate_duration_s} s "
        f"({config.rate_vouchers:,} vouchers, open loop)"
    )


def render_text(runs: Sequence[PhaseRun], targets: Sequence[Target], cores: int) -> str:
    """The summary printed at the end."""
    cpu_headers = ("CPU ms per voucher", *(run.name for run in runs))
    busy_headers = ("CPU busy, % of one core", *(run.name for run in runs))
    return "\n".join(
        [
            "Phases (latency: READY answered 200 -> Doshii request activated):",
            report.text_table(PHASE_HEADERS, phase_rows(runs)),
            *(f"  {line}" for line in phase_notes(runs)),
            "",
            report.text_table(cpu_headers, cpu_rows(runs, per_voucher_cell)),
            "",
            report.text_table(busy_headers, cpu_rows(runs, busy_cell)),
            "",
            "CPU ceiling (vouchers/s the CPU cost allows if nothing else ran):",
            *(f"  {line}" for line in ceiling_lines(runs, cores)),
            "",
            "Targets:",
            *(f"  {target.line()}" for target in targets),
        ]
    )


def render_markdown(
    config: Config,
    machine: Machine,
    settings: Settings,
    when: datetime,
    runs: Sequence[PhaseRun],
    targets: Sequence[Target],
) -> str:
    """The results file: when and where, how, the tables and the targets."""
    cpu_headers = ("CPU ms per voucher", *(run.name for run in runs))
    busy_headers = ("CPU busy, % of one core", *(run.name for run in runs))
    return "\n".join(
        [
            "# Pipeline benchmark",
            "",
            f"Measured {when:%Y-%m-%d %H:%M} UTC with `python -m bench pipeline`.",
            "",
            *(f"- {line}" for line in machine.lines()),
            f"- load: {load_line(config)}",
            f"- {settings_line(settings)}",
            "- processes: `bridge ingress` and `bridge worker reservations|pdfs|lifecycle|doshii`, "
            "each its own process; the load driver (Jackpot and the POS) is one more process, "
            "hosting both sandboxes in a thread of their own; RabbitMQ's `beam.smp`.",
            "- vouchers/s: activated vouchers / (first RESERVED sent -> last activation). "
            "Latency: the driver's clock when READY got its 200 -> the Doshii record's "
            "`updatedAt` when the activation was applied (same clock, millisecond resolution).",
            "- CPU: utime+stime from /proc/PID/stat around each phase (the sandbox thread from "
            "/proc/PID/task/TID/stat, the driver is its process minus that thread); broker CPU is "
            "every `beam.smp`, so anything else using RabbitMQ meanwhile counts too.",
            "",
            "## Phases",
            "",
            report.markdown_table(PHASE_HEADERS, phase_rows(runs)),
            "",
            *(f"- {line}" for line in phase_notes(runs)),
            "",
            "## CPU per voucher (ms)",
            "",
            report.markdown_table(cpu_headers, cpu_rows(runs, per_voucher_cell)),
            "",
            "## CPU busy (% of one core)",
            "",
            report.markdown_table(busy_headers, cpu_rows(runs, busy_cell)),
            "",
            "## CPU ceiling (vouchers/s the CPU cost allows if nothing else ran)",
            "",
            *(f"- {line}" for line in ceiling_lines(runs, machine.cpus)),
            "",
            "## Targets",
            "",
            *(f"- {target.line()}" for target in targets),
            "",
        ]
    )


async def _phase(
    bench: PipelineBench,
    driver: Driver,
    name: str,
    load: Callable[[], Awaitable[float | None]],
    profile_dir: Path | None = None,
) -> PhaseRun:
    profiled = "" if profile_dir is None else f" (py-spy recording into {profile_dir})"
    print(f"{name}: starting{profiled}", flush=True)
    run = await bench.measure(driver, name, load, profile_dir)
    run.figures = figures(run.traces, await bench.dead_voucher_ids())
    result = run.result
    print(
        f"{name}: {result.sent:,} sent, {result.activated:,} activated, {result.lost:,} lost, "
        f"{result.dead:,} dead; {_fmt(result.per_s, 1)} vouchers/s; READY -> activated "
        f"p50 {_fmt(result.p50_ms, 1)} ms, p99 {_fmt(result.p99_ms, 1)} ms",
        flush=True,
    )
    return run


async def _drive(bench: PipelineBench, config: Config) -> list[PhaseRun]:
    """Warm-up, throughput and fixed-rate phases against the running processes."""
    amount_cents = value_to_cents(VOUCHER_VALUE, bench.settings.value_to_cents)
    connector = aiohttp.TCPConnector(limit=DRIVER_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=NOTIFY_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        driver = Driver(
            sandboxes=bench.sandboxes,
            thread=bench.thread,
            keys=KeyRing(bench.settings.key_secrets),
            session=session,
            notification_url=bench.ingress_url,
            amount_cents=amount_cents,
        )
        runs = []
        if config.warmup:

            async def warmup() -> None:
                await closed_loop(driver, config.warmup, config.in_flight)

            runs.append(await _phase(bench, driver, "warm-up", warmup))

        async def throughput() -> None:
            await closed_loop(driver, config.vouchers, config.in_flight)

        async def fixed_rate() -> float:
            return await open_loop(driver, config.rate_vouchers, config.rate_per_s)

        runs.append(
            await _phase(bench, driver, config.throughput_name, throughput, config.pyspy_dir)
        )
        runs.append(await _phase(bench, driver, config.rate_name, fixed_rate))
        return runs


async def _run(config: Config) -> int:
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    machine = describe()
    when = datetime.now(UTC)
    print(f"bench pipeline: {load_line(config)}", flush=True)
    for line in machine.lines():
        print(f"  {line}", flush=True)
    async with AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipeline-")))
        admin = await BrokerAdmin.open(AMQP_URL)
        stack.push_async_callback(admin.close)
        thread = SandboxThread(LOOPBACK)
        sandboxes = thread.start()
        stack.callback(thread.stop)
        bench = PipelineBench(config, workdir, sandboxes, thread, admin)
        print(f"  {settings_line(bench.settings)}", flush=True)
        if not bench.broker_pids:
            print("  warning: no beam.smp process found; broker CPU reads as 0", flush=True)
        print(f"  namespace {bench.namespace}; starting the ingress and four workers", flush=True)
        await bench.start(stack)
        print(f"  {bench.pids_line()}", flush=True)
        runs = await _drive(bench, config)
        settings = bench.settings
    measured = [run for run in runs if run.name != "warm-up"]
    throughput, rate = measured
    targets = evaluate_targets(throughput, rate, config)
    print()
    print(render_text(measured, targets, machine.cpus))
    if throughput.profile:
        print(
            f"\npy-spy during {throughput.name}, {pyspy.SAMPLE_RATE_HZ} samples/s per process "
            "(% of that process's or thread's samples; the sampling perturbs the figures above):"
        )
        print("\n".join(throughput.profile))
    if config.pyspy_dir is not None:
        print(f"\nprofiled run: {RESULTS_PATH} left as it was")
    else:
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_PATH.write_text(render_markdown(config, machine, settings, when, measured, targets))
        print(f"\nwritten to {RESULTS_PATH}")
    if any(run.result.lost or run.result.dead for run in runs):
        print("!!! vouchers were lost or dead-lettered: see above", file=sys.stderr)
        return EXIT_LOST
    return 0


def main() -> int:
    """Entry point for `python -m bench pipeline`: 0 when nothing was lost nor dead-lettered."""
    config = Config.from_env()
    if config.pyspy_dir is not None:
        config.pyspy_dir.mkdir(parents=True, exist_ok=True)
    previous_interval_s = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(config))
    except PipelineError as error:
        print(f"bench pipeline: {error}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except asyncio.CancelledError:
        print("bench pipeline: stopped by SIGTERM; processes stopped", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print("bench pipeline: interrupted; processes stopped", file=sys.stderr)
        return EXIT_SIGINT
    finally:
        sys.setswitchinterval(previous_interval_s)
