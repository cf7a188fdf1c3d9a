"""The pipeline benchmark: voucher-bridge and the FastStream peer side by side, end to end.

Two subjects do the same job, each as its own OS processes, as in production: `bridge ingress`
and `bridge worker reservations|pdfs|lifecycle|doshii` for voucher-bridge;
`python faststream_pipeline.py ingress|reservations|pdfs|lifecycle|doshii` for the peer of
`../shared/anchors` (BENCH_ANCHORS_DIR elsewhere). Both are started once with the same settings
(each its own ports and PDF folder), the same sandboxes and the same broker, RabbitMQ's
`beam.smp`. This process is the load driver: it hosts both sandboxes in a thread of their own
(their own event loop, so their CPU is read apart from the driver's) and plays Jackpot and the
POS: for each voucher it opens a Doshii request, mints the key, reserves a Jackpot voucher,
POSTs RESERVED to the subject's ingress, waits until the reservations worker confirmed at the
Jackpot sandbox, marks the voucher READY and POSTs READY with a fresh signed link, then waits
until the Doshii request is activated.

Rounds alternate the subjects (peer, bridge, peer, bridge, ...; three rounds by default). In
each, a subject gets a short warm-up (discarded); a throughput phase, closed loop with a bounded
number of vouchers in flight; a latency phase, open loop at a fixed offered rate. Per phase:
vouchers/s from the first RESERVED sent to the last activation, READY-accepted -> activated
p50/p99, CPU per voucher per process from /proc, and sent = activated + dead + lost with dead
letters read from the subject's dead queue (`<ns>.dead`, or the peer's `<ns>-peer.dead`). The
medians over the rounds are printed side by side and as ratios bridge / peer, with the targets,
and written to bench/results/pipeline-latest.md.

With BENCH_PIPELINE_PYSPY=DIR, py-spy records every busy process of each subject and the driver
during the first round's throughput phase (raw profiles kept in DIR/<subject>/) and the hot
spots are printed; such a run's figures are perturbed by the sampling, so it leaves the results
file as it was.
"""

from __future__ import annotations

import asyncio
import collections
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
from bench.deps import Requirement
from bench.machine import Machine, describe
from bench.pipeline_compare import (
    BASELINE,
    BRIDGE,
    KNOWN_SUBJECTS,
    NO_LEDGER,
    PEER,
    RATE,
    SUBJECTS,
    THROUGHPUT,
    Measured,
    SubjectSummary,
    by_subject,
    comparison_targets,
    fmt,
    headline_headers,
    headline_rows,
    ledger_targets,
    ratio_headers,
    round_rows,
    summarize,
)
from bench.pipeline_compare import ROUND_HEADERS as ROUND_TABLE_HEADERS
from bench.pipeline_compare import cpu_rows as compare_cpu_rows
from bench.pipeline_stats import (
    US_PER_MS,
    Figures,
    Trace,
    ceiling_per_s,
    cpu_deltas,
    cpu_ms_per_voucher,
    epoch_s,
    failure_counts,
    figures,
    non_negative_int,
    parse_machine_busy_ticks,
    parse_own_cpu_ticks,
    parse_subjects,
    peer_dead_letter,
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
from shared.ledger import Ledger, create_pool, schema_for
from shared.models import KeyClaims, value_to_cents
from shared.settings import ENV_PREFIX, Settings, load_settings
from workers import dlq

# What the FastStream peer imports beyond the project's own dependencies.
REQUIREMENTS = (Requirement("faststream", (0, 7), "faststream[rabbit]>=0.7"),)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANCHORS_DIR = REPO.parent / "shared" / "anchors"
PEER_SCRIPT = "faststream_pipeline.py"
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "pipeline-latest.md"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
BROKER_PORT = 5672  # the port of AMQP_URL: its beam.smp is the broker whose CPU is read
LOOPBACK = "127.0.0.1"
NAMESPACE_PREFIX = "bench-pipe-"
NAMESPACE_RANDOM_BYTES = 4
WORKER_ROLES = ("reservations", "pdfs", "lifecycle", "doshii")

# Three rounds per subject: the median of three survives one round disturbed by the machine's
# other work; each round of both subjects takes about a minute and a half on two cores.
DEFAULT_ROUNDS = 3
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
# The peer's `purge` (delete its queues and exchanges) is one short broker session.
PEER_PURGE_TIMEOUT_S = 60.0

# Earlier targets of voucher-bridge alone, on its medians.
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
LEDGER_WORKER = "worker ledger"
POSTGRES = "PostgreSQL (every postgres process)"
LEDGER_TOTAL = "ledger: worker + PostgreSQL"
SUBJECT_TOTAL = "ingress + workers"
ALL_TOTAL = "everything above"
IDLE = "the other subject (idle)"
MACHINE = "machine, all CPUs"
OTHERS = "rest of the machine (not ours)"
WORKERS = tuple(f"worker {role}" for role in WORKER_ROLES)
PROCESS_ORDER = (INGRESS, *WORKERS, LEDGER_WORKER, SANDBOXES, DRIVER, BROKER, POSTGRES)
CPU_ROWS = (*PROCESS_ORDER, SUBJECT_TOTAL, LEDGER_TOTAL, ALL_TOTAL, IDLE, OTHERS)
# What py-spy records when asked: every busy subject process and the driver. The bridge's
# lifecycle and doshii workers idle here (its pdfs worker activates); the peer's doshii does not.
PROFILED = (INGRESS, "worker reservations", "worker pdfs", "worker doshii", LEDGER_WORKER)
DRIVER_THREADS = {"MainThread": DRIVER, THREAD_NAME: SANDBOXES}
_AFTER_RESERVED = tuple(state.value for state in State if state is not State.RESERVED)


class PipelineError(Exception):
    """The benchmark cannot go on (a process died, the setup failed); the message says why."""


@dataclass(frozen=True)
class Config:
    """The knobs, from BENCH_PIPELINE_* (and BENCH_ANCHORS_DIR) environment variables."""

    rounds: int
    subjects: tuple[str, ...]
    vouchers: int
    in_flight: int
    rate_per_s: int
    rate_duration_s: int
    warmup: int
    anchors_dir: Path
    baseline_dir: Path | None
    pyspy_dir: Path | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """BENCH_PIPELINE_ROUNDS, _SUBJECTS, _VOUCHERS, _IN_FLIGHT, _RATE, _RATE_S, _WARMUP,
        _BASELINE, _PYSPY and BENCH_ANCHORS_DIR; exit if bad."""
        pyspy_dir = env.get("BENCH_PIPELINE_PYSPY", "").strip()
        baseline = env.get("BENCH_PIPELINE_BASELINE", "").strip()
        baseline_dir = Path(baseline).resolve() if baseline else None
        default = (PEER, BASELINE, BRIDGE) if baseline_dir else SUBJECTS
        subjects = parse_subjects(
            env.get("BENCH_PIPELINE_SUBJECTS", ",".join(default)), KNOWN_SUBJECTS
        )
        anchors_dir = Path(env.get("BENCH_ANCHORS_DIR", str(DEFAULT_ANCHORS_DIR))).resolve()
        if PEER in subjects and not (anchors_dir / PEER_SCRIPT).is_file():
            raise SystemExit(f"{anchors_dir} lacks {PEER_SCRIPT} (set BENCH_ANCHORS_DIR)")
        if BASELINE in subjects and (
            baseline_dir is None or not (baseline_dir / "bridge" / "cli.py").is_file()
        ):
            raise SystemExit(
                "the baseline subject needs BENCH_PIPELINE_BASELINE, a voucher-bridge checkout "
                f"(with bridge/cli.py), not {baseline!r}"
            )
        return cls(
            rounds=positive_int(env, "BENCH_PIPELINE_ROUNDS", DEFAULT_ROUNDS),
            subjects=subjects,
            vouchers=positive_int(env, "BENCH_PIPELINE_VOUCHERS", DEFAULT_VOUCHERS),
            in_flight=positive_int(env, "BENCH_PIPELINE_IN_FLIGHT", DEFAULT_IN_FLIGHT),
            rate_per_s=positive_int(env, "BENCH_PIPELINE_RATE", DEFAULT_RATE_PER_S),
            rate_duration_s=positive_int(env, "BENCH_PIPELINE_RATE_S", DEFAULT_RATE_DURATION_S),
            warmup=non_negative_int(env, "BENCH_PIPELINE_WARMUP", DEFAULT_WARMUP_VOUCHERS),
            anchors_dir=anchors_dir,
            baseline_dir=baseline_dir,
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
    """One measured phase of one subject: its vouchers, the CPU used meanwhile, what came of it."""

    subject: str
    round_number: int
    phase: str  # "warm-up", THROUGHPUT or RATE
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
    def label(self) -> str:
        """`round 2 peer throughput (64 in flight)`."""
        return f"round {self.round_number} {self.subject} {self.name}"

    @property
    def result(self) -> Figures:
        """The phase's figures (set once its dead letters were read)."""
        if self.figures is None:
            raise RuntimeError(f"phase {self.label} has no figures yet")
        return self.figures

    def measured(self) -> Measured:
        """The phase as the side-by-side summary takes it: figures and CPU ms per voucher."""
        rows = with_totals(self.cpu_ticks)
        return Measured(
            subject=self.subject,
            round_number=self.round_number,
            phase=self.phase,
            figures=self.result,
            cpu_ms={row: cpu_ms_per_voucher(t, self.result.sent) for row, t in rows.items()},
        )


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

    def begin_phase(self, notification_url: str) -> list[Trace]:
        """Start counting afresh against the ingress at `notification_url`; returns the list
        the phase's traces go to."""
        self.notification_url = notification_url
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


def shared_values(namespace: str, sandboxes: Sandboxes) -> dict[str, str]:
    """Settings every process of both subjects gets (by field name); the rest are defaults.

    Each subject adds its own ingress port and folders; each worker its own health port.
    """
    return {
        **sandboxes.settings_overrides(),
        "amqp_url": AMQP_URL,
        "namespace": namespace,
        "key_secrets": secrets.token_urlsafe(32),
        "http_host": LOOPBACK,
        # As in production: info-level logs (to a file each here); the bridge's metrics are on.
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


def peer_argv(anchors_dir: Path, role: str) -> list[str]:
    """The FastStream peer's command for one role, on this interpreter."""
    return [sys.executable, str(anchors_dir / PEER_SCRIPT), role]


class Subject:
    """One implementation under test: its ingress and four workers, each its own process."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        values: Mapping[str, str],
        argv: Callable[[str], list[str]],
        *,
        cwd: Path = REPO,
        extra_env: Mapping[str, str] | None = None,
        roles: Sequence[str] = WORKER_ROLES,
    ) -> None:
        self.name = name
        ingress_port = servers.free_port()
        self.values = {
            **values,
            "http_port": str(ingress_port),
            "pdf_dir": str(workdir / name / "pdfs"),
            "spool_dir": str(workdir / name / "spool"),
        }
        self.env = {**os.environ, **(extra_env or {}), **as_env(self.values)}
        logs = workdir / name
        logs.mkdir(parents=True, exist_ok=True)
        self.servers = [
            Server(
                name=INGRESS,
                argv=argv(INGRESS),
                env=self.env,
                port=ingress_port,
                log_path=logs / "ingress.log",
                probe=Probe.READYZ,
                cwd=cwd,
            )
        ]
        for role in roles:
            process_name = f"worker {role}"
            port = servers.free_port()
            self.servers.append(
                Server(
                    name=process_name,
                    argv=argv(role),
                    env={**self.env, **as_env({"worker_http_port": str(port)})},
                    port=port,
                    log_path=logs / f"worker-{role}.log",
                    probe=Probe.READYZ,
                    cwd=REPO,
                )
            )
        self.ingress_url = f"http://{LOOPBACK}:{ingress_port}{NOTIFICATION_PATH}"

    async def dead_voucher_ids(self) -> set[str]:
        """Voucher ids of every dead letter of this subject (the letters stay where they are)."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """What the subject needs before its processes start (nothing, by default)."""

    async def cleanup(self) -> None:
        """Delete the subject's queues and exchanges."""
        raise NotImplementedError


POSTGRES_COMM = "postgres"


def _bridge_args(role: str) -> list[str]:
    return [role] if role == INGRESS else ["worker", role]


class BridgeSubject(Subject):
    """voucher-bridge: `bridge ingress`, `bridge worker ROLE`; dead letters in `<ns>.dead`.

    With `checkout`, the `baseline` subject: `python -m bridge` from that folder (PYTHONPATH
    and working directory), in a namespace of its own, `<ns>-base`.
    """

    def __init__(
        self,
        workdir: Path,
        values: Mapping[str, str],
        admin: BrokerAdmin,
        checkout: Path | None = None,
        *,
        ledger: bool = True,
    ) -> None:
        if not ledger:
            super().__init__(
                NO_LEDGER,
                workdir,
                {**values, "namespace": f"{values['namespace']}-nl", "ledger": "false"},
                lambda role: bridge_argv(*_bridge_args(role)),
            )
        elif checkout is None:
            super().__init__(
                BRIDGE,
                workdir,
                {**values, "database_schema": schema_for(values["namespace"])},
                lambda role: bridge_argv(*_bridge_args(role)),
                roles=(*WORKER_ROLES, "ledger"),
            )
        else:
            namespace = f"{values['namespace']}-base"
            super().__init__(
                BASELINE,
                workdir,
                {**values, "namespace": namespace, "database_schema": schema_for(namespace)},
                lambda role: [sys.executable, "-m", "bridge", *_bridge_args(role)],
                roles=(*WORKER_ROLES, "ledger"),
                cwd=checkout,
                extra_env={"PYTHONPATH": str(checkout)},
            )
        self.settings = load_settings(**self.values)
        self._admin = admin

    async def dead_voucher_ids(self) -> set[str]:
        """Read with `bridge dlq`'s own listing."""
        try:
            letters = await dlq.list_dead(self.settings)
        except (aio_pika.exceptions.AMQPError, OSError) as error:
            raise PipelineError(f"cannot read the dead queue: {error}") from error
        for letter in letters:
            print(f"  {self.name} dead letter {letter.message_id}: {letter.reason}", flush=True)
        return {letter.voucher_id for letter in letters}

    async def prepare(self) -> None:
        """`bridge db upgrade` for the run's own ledger schema, when this subject keeps one."""
        if self.settings.ledger and self.name in (BRIDGE, BASELINE):
            pool = await create_pool(self.settings, max_size=1)
            try:
                await Ledger(pool).upgrade(self.settings.database_schema)
            finally:
                await pool.close()

    async def cleanup(self) -> None:
        """Every exchange and queue of the namespace, delay tiers included; the ledger schema."""
        await self._admin.delete_namespace(
            self.settings.namespace, tiers_s=self.settings.retry_tiers_s
        )
        if self.settings.ledger and self.name in (BRIDGE, BASELINE):
            pool = await create_pool(self.settings, max_size=1)
            try:
                await pool.execute(
                    f'DROP SCHEMA IF EXISTS "{self.settings.database_schema}" CASCADE'
                )
            finally:
                await pool.close()


class PeerSubject(Subject):
    """The FastStream peer: one process per role; dead letters in `<ns>-peer.dead`."""

    def __init__(
        self, workdir: Path, values: Mapping[str, str], admin: BrokerAdmin, anchors_dir: Path
    ) -> None:
        super().__init__(PEER, workdir, values, lambda role: peer_argv(anchors_dir, role))
        self._anchors_dir = anchors_dir
        self._admin = admin
        self.dead_queue = f"{values['namespace']}-peer.dead"

    async def dead_voucher_ids(self) -> set[str]:
        """Peek at the peer's dead queue: the broker's x-first-death-* headers say why."""
        try:
            messages = await self._admin.peek(self.dead_queue)
        except (aio_pika.exceptions.AMQPError, OSError) as error:
            raise PipelineError(f"cannot read {self.dead_queue}: {error}") from error
        ids = set()
        for message in messages:
            voucher_id, reason = peer_dead_letter(
                message.correlation_id, message.body, message.headers or {}
            )
            print(f"  {PEER} dead letter {message.message_id}: {reason}", flush=True)
            ids.add(voucher_id)
        return ids

    async def cleanup(self) -> None:
        """The peer's own `purge`: it deletes its queues and exchanges of the namespace."""
        process = await asyncio.create_subprocess_exec(
            *peer_argv(self._anchors_dir, "purge"),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(PEER_PURGE_TIMEOUT_S):
                _, errors = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            print(f"  warning: the peer's purge did not end in {PEER_PURGE_TIMEOUT_S:.0f} s")
            return
        if process.returncode != 0:
            print(f"  warning: the peer's purge failed: {errors.decode(errors='replace')[-500:]}")


class PipelineBench:
    """The subjects' processes, the driver, and the measurements of one benchmark run."""

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
        # One set of values for both subjects: the same secrets, sandboxes and namespace (the
        # peer's topology sits beside the bridge's as `<ns>-peer.*`).
        values = shared_values(self.namespace, sandboxes)
        made: dict[str, Subject] = {}
        for name in config.subjects:
            if name == BRIDGE:
                made[name] = BridgeSubject(workdir, values, admin)
            elif name == NO_LEDGER:
                made[name] = BridgeSubject(workdir, values, admin, ledger=False)
            elif name == BASELINE:
                made[name] = BridgeSubject(workdir, values, admin, config.baseline_dir)
            else:
                made[name] = PeerSubject(workdir, values, admin, config.anchors_dir)
        self.subjects = [made[name] for name in config.subjects]
        self.settings = load_settings(**values, pdf_dir=str(workdir), spool_dir=str(workdir))
        self.broker_pids = procstat.broker_pids(BROKER_PORT)

    async def start(self, stack: AsyncExitStack) -> None:
        """Start every subject's processes (each stopped by `stack`), then wait until all are
        ready; each subject's queues are deleted once its processes have stopped."""
        for subject in self.subjects:
            stack.push_async_callback(subject.cleanup)
            await subject.prepare()
            for server in subject.servers:
                stack.push_async_callback(servers.stop, server)
                await servers.start(server)
        every = [server for subject in self.subjects for server in subject.servers]
        try:
            await asyncio.gather(*(servers.wait_ready(server) for server in every))
        except RuntimeError as error:  # wait_ready's word for "exited" or "not ready in time"
            raise PipelineError(str(error)) from error

    def pids_line(self) -> str:
        """Which process is which, for attaching a profiler."""
        parts = [
            f"{s.name} {server.name} {server.pid}" for s in self.subjects for server in s.servers
        ]
        parts.append(f"{DRIVER} {os.getpid()} (sandbox thread {self.thread.native_id})")
        parts.append(f"broker {','.join(map(str, self.broker_pids)) or 'not found'}")
        return "pids: " + "; ".join(parts)

    def check_alive(self) -> None:
        """Raise if a subject's process has exited, with the end of its log."""
        for subject in self.subjects:
            for server in subject.servers:
                process = server.process
                if process is None or process.returncode is not None:
                    code = None if process is None else process.returncode
                    raise PipelineError(
                        f"{subject.name} {server.name} exited (status {code}) during the run:\n"
                        f"{server.log_tail()}"
                    )

    def cpu_snapshot(self, active: Subject) -> dict[str, int]:
        """CPU ticks used so far by the active subject's processes, the other subjects' (idle)
        processes together, the sandbox thread, the driver, the broker and the machine."""
        try:
            ticks = {server.name: procstat.cpu_ticks(server.pid) for server in active.servers}
            ticks[IDLE] = sum(
                procstat.cpu_ticks(server.pid)
                for subject in self.subjects
                if subject is not active
                for server in subject.servers
            )
        except OSError as error:
            self.check_alive()
            raise PipelineError(f"cannot read a subject process's CPU: {error}") from error
        pid = os.getpid()
        sandbox = own_cpu_ticks(pid, self.thread.native_id)
        ticks[SANDBOXES] = sandbox
        ticks[DRIVER] = own_cpu_ticks(pid) - sandbox
        ticks[BROKER] = procstat.total_cpu_ticks(self.broker_pids)
        # Backends that ended meanwhile count through the postmaster's reaped-children time.
        ticks[POSTGRES] = procstat.total_cpu_ticks(procstat.pids_named(POSTGRES_COMM))
        ticks[MACHINE] = parse_machine_busy_ticks((procstat.PROC / "stat").read_text())
        return ticks

    async def _progress(self, label: str, traces: Sequence[Trace], started: float) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            self.check_alive()
            ready = sum(t.ready_accepted_s is not None for t in traces)
            activated = sum(t.activated for t in traces)
            failed = sum(t.failure is not None for t in traces)
            print(
                f"  {label}: {time.monotonic() - started:5.1f} s  sent {len(traces):,}  "
                f"READY accepted {ready:,}  activated {activated:,}  failed {failed:,}",
                flush=True,
            )

    async def _start_profiles(self, subject: Subject, directory: Path) -> list[pyspy.Recorder]:
        py_spy = pyspy.executable()
        if py_spy is None:
            raise PipelineError("BENCH_PIPELINE_PYSPY is set, but py-spy is not installed")
        recorders = [
            pyspy.Recorder(s.name, s.pid, directory / f"{s.name.replace(' ', '-')}.txt")
            for s in subject.servers
            if s.name in PROFILED
        ]
        recorders.append(
            pyspy.Recorder(DRIVER, os.getpid(), directory / "driver.txt", threads=True)
        )
        for recorder in recorders:
            await recorder.start(py_spy)
        return recorders

    @staticmethod
    async def _stop_profiles(
        recorders: Sequence[pyspy.Recorder],
    ) -> list[tuple[pyspy.Recorder, list[pyspy.Stack]]]:
        profiles = await asyncio.gather(*(recorder.stop() for recorder in recorders))
        return list(zip(recorders, profiles, strict=True))

    async def measure(
        self,
        driver: Driver,
        subject: Subject,
        run: PhaseRun,
        load: Callable[[], Awaitable[float | None]],
        profile_dir: Path | None = None,
    ) -> None:
        """Run one phase's load against `subject`, CPU read around it and progress shown; then
        settle and read its dead letters. With `profile_dir`, py-spy records meanwhile."""
        run.traces = driver.begin_phase(subject.ingress_url)
        recorders = (
            await self._start_profiles(subject, profile_dir) if profile_dir is not None else []
        )
        before = self.cpu_snapshot(subject)
        started = time.monotonic()
        loading = asyncio.ensure_future(load())
        progress = asyncio.ensure_future(self._progress(run.label, run.traces, started))
        try:
            await asyncio.wait({loading, progress}, return_when=asyncio.FIRST_COMPLETED)
            if progress.done():
                progress.result()  # a process died: raise its story
            run.offered_per_s = await loading
        finally:
            for task in (loading, progress):
                task.cancel()
            await asyncio.gather(loading, progress, return_exceptions=True)
        run.wall_s = time.monotonic() - started
        run.cpu_ticks = cpu_deltas(before, self.cpu_snapshot(subject))
        run.refusals = dict(driver.refusals)
        run.spooled = driver.spooled
        profiles = await self._stop_profiles(recorders) if recorders else []
        await asyncio.sleep(SETTLE_S)
        run.figures = figures(run.traces, await subject.dead_voucher_ids())
        if profiles:
            run.profile = profile_lines(subject.name, profiles, run)


def profile_lines(
    subject: str,
    profiles: Sequence[tuple[pyspy.Recorder, Sequence[pyspy.Stack]]],
    run: PhaseRun,
) -> list[str]:
    """Hot spots of each recorded process, shares also as µs per voucher of the phase."""

    def us_per_voucher(name: str) -> float:
        return cpu_ms_per_voucher(run.cpu_ticks.get(name, 0), run.result.sent) * US_PER_MS

    lines: list[str] = []
    for recorder, stacks in profiles:
        if not recorder.threads:
            title = f"{subject} {recorder.name} (pid {recorder.pid})"
            lines += pyspy.summary(title, stacks, us_per_voucher=us_per_voucher(recorder.name))
            continue
        for thread, part in pyspy.split_threads(stacks).items():
            name = DRIVER_THREADS.get(thread)
            if name is None:
                title, cost = f"{recorder.name}, thread {thread} (pid {recorder.pid})", None
            else:
                title, cost = f"{name} (pid {recorder.pid})", us_per_voucher(name)
            lines += pyspy.summary(title, part, us_per_voucher=cost)
    return lines


def with_totals(ticks: Mapping[str, int]) -> dict[str, int]:
    """CPU_ROWS from one phase's ticks: the processes, then the totals."""
    rows = {name: ticks.get(name, 0) for name in PROCESS_ORDER}
    # The bridge's own processes, its ledger worker included (PostgreSQL is infrastructure,
    # like the broker, and has its own row; the ledger's row adds the two).
    rows[SUBJECT_TOTAL] = sum(rows[name] for name in (INGRESS, *WORKERS, LEDGER_WORKER))
    rows[LEDGER_TOTAL] = rows[LEDGER_WORKER] + rows[POSTGRES]
    rows[ALL_TOTAL] = sum(rows[name] for name in PROCESS_ORDER)
    rows[IDLE] = ticks.get(IDLE, 0)
    rows[OTHERS] = max(ticks.get(MACHINE, 0) - rows[ALL_TOTAL] - rows[IDLE], 0)
    return rows


def bridge_alone_targets(summary: SubjectSummary, config: Config) -> list[Target]:
    """The earlier targets of voucher-bridge by itself, on its medians."""
    return [
        Target(
            f"bridge sustained >= {TARGET_MIN_VOUCHERS_PER_S:.0f} vouchers/s (closed loop)",
            f"{fmt(summary.per_s, 1)} vouchers/s",
            summary.per_s >= TARGET_MIN_VOUCHERS_PER_S,
        ),
        Target(
            f"bridge p99 READY accepted -> activated <= {TARGET_MAX_P99_MS:.0f} ms at "
            f"{config.rate_per_s} vouchers/s offered",
            f"{fmt(summary.p99_ms, 1)} ms (p50 {fmt(summary.p50_ms, 1)} ms)",
            summary.p99_ms <= TARGET_MAX_P99_MS,
        ),
    ]


def ceiling_lines(summaries: Sequence[SubjectSummary], cores: int) -> list[str]:
    """What each subject's median CPU cost per voucher allows on this machine's cores."""
    lines = []
    for s in summaries:
        everything, own = s.cpu_ms[ALL_TOTAL], s.cpu_ms[SUBJECT_TOTAL]
        lines.append(
            f"{s.subject}: {cores} CPUs x 1000 ms / {fmt(everything, 2)} ms per voucher = "
            f"{fmt(ceiling_per_s(everything, cores), 0)} vouchers/s with the whole machine ours; "
            f"its own processes alone ({fmt(own, 2)} ms) would allow "
            f"{fmt(ceiling_per_s(own, cores), 0)} vouchers/s"
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
            f"{run.label}: first RESERVED -> last activation {fmt(figures_.span_s, 2)} s, "
            f"CPU window {run.wall_s:.2f} s{offered}; activated {figures_.activated:,}; "
            f"ingress answers other than 200: {refused or 'none'}; spooled {run.spooled}; "
            f"driver-side failures: {failures or 'none'}"
        )
    return lines


def settings_line(settings: Settings) -> str:
    """The settings that shape the run (defaults unless BRIDGE_* says otherwise)."""
    tiers = ",".join(map(str, settings.retry_tiers_s))
    return (
        f"settings: prefetch {settings.prefetch}, concurrency {settings.concurrency} "
        f"(per bridge worker process), delivery limit {settings.delivery_limit}, "
        f"log level {settings.log_level} (to a file per process; JSON for the bridge), "
        f"bridge metrics on, confirm mode {settings.jackpot_confirm}, bridge retry tiers "
        f"{tiers} s, quick retries {settings.quick_retries}"
    )


def load_line(config: Config) -> str:
    """What the driver offers each subject, round by round."""
    return (
        f"{config.rounds} round(s) of {', '.join(config.subjects)}; each: warm-up "
        f"{config.warmup:,} vouchers (discarded); throughput: {config.vouchers:,} vouchers, at "
        f"most {config.in_flight} in flight (closed loop); latency: one voucher every "
        f"{1000 / config.rate_per_s:g} ms for {config.rate_duration_s} s "
        f"({config.rate_vouchers:,} vouchers, open loop)"
    )


@dataclass(frozen=True)
class Outcome:
    """Everything the report shows: the runs, their summaries and the targets' verdicts."""

    runs: list[PhaseRun]  # measured phases only, in the order they ran
    summaries: list[SubjectSummary]
    targets: list[Target]
    alone: list[Target]


def outcome(runs: Sequence[PhaseRun], config: Config) -> Outcome:
    """Medians and verdicts of the measured phases."""
    measured = [run for run in runs if run.phase != "warm-up"]
    summaries = summarize([run.measured() for run in measured], config.subjects, CPU_ROWS)
    bridge = by_subject(summaries).get(BRIDGE)
    return Outcome(
        runs=measured,
        summaries=summaries,
        targets=[
            *comparison_targets(summaries, SUBJECT_TOTAL, config.rate_per_s),
            *ledger_targets(summaries, LEDGER_TOTAL),
        ],
        alone=[] if bridge is None else bridge_alone_targets(bridge, config),
    )


def _sections(result: Outcome, cores: int) -> list[tuple[str, Sequence[str], list[list[str]]]]:
    names = [s.subject for s in result.summaries]
    cpu_headers = ("CPU ms per voucher, median", *names, *ratio_headers(result.summaries))
    return [
        (
            "Medians (READY answered 200 -> Doshii request activated at the fixed rate)",
            headline_headers(result.summaries),
            headline_rows(result.summaries, SUBJECT_TOTAL),
        ),
        (
            "CPU ms per voucher, closed loop",
            cpu_headers,
            compare_cpu_rows(result.summaries, CPU_ROWS, lambda s: s.cpu_ms),
        ),
        (
            "CPU ms per voucher, fixed rate",
            cpu_headers,
            compare_cpu_rows(result.summaries, CPU_ROWS, lambda s: s.rate_cpu_ms),
        ),
        (
            "Every measured phase",
            ROUND_TABLE_HEADERS,
            round_rows([run.measured() for run in result.runs], SUBJECT_TOTAL),
        ),
    ]


def _tail(result: Outcome, cores: int) -> list[tuple[str, list[str]]]:
    return [
        ("Counts (every measured phase)", [s.counts_line() for s in result.summaries]),
        ("CPU ceiling (vouchers/s the CPU cost allows if nothing else ran)",
         ceiling_lines(result.summaries, cores)),
        ("Targets (bridge against the peer, medians of this run)",
         [t.line() for t in result.targets] or ["n/a: both subjects must run"]),
        ("Earlier targets (bridge alone)", [t.line() for t in result.alone] or ["n/a"]),
    ]  # fmt: skip


def render_text(result: Outcome, cores: int) -> str:
    """The summary printed at the end."""
    lines: list[str] = []
    for title, headers, rows in _sections(result, cores):
        lines += [f"{title}:", report.text_table(headers, rows), ""]
    for title, items in _tail(result, cores):
        lines += [f"{title}:", *(f"  {item}" for item in items), ""]
    return "\n".join(lines).rstrip()


def render_markdown(
    config: Config, machine: Machine, settings: Settings, when: datetime, result: Outcome
) -> str:
    """The results file: when and where, how, the tables and the targets."""
    lines = [
        "# Pipeline benchmark: voucher-bridge and the FastStream peer",
        "",
        f"Measured {when:%Y-%m-%d %H:%M} UTC with `python -m bench pipeline`.",
        "",
        *(f"- {line}" for line in machine.lines()),
        f"- load: {load_line(config)}",
        f"- {settings_line(settings)}",
        "- processes: bridge: `bridge ingress` and `bridge worker reservations|pdfs|lifecycle|"
        "doshii|ledger` (no-ledger: no ledger worker, `BRIDGE_LEDGER=false`); its pdfs worker "
        "activates the card itself; peer: "
        f"`python {PEER_SCRIPT} ingress|reservations|pdfs|lifecycle|doshii`; each its own "
        "process, all started once; the load driver (Jackpot and the POS) is one more "
        "process, hosting both sandboxes in a thread of their own; RabbitMQ's `beam.smp`.",
        *(
            [
                f"- baseline: `python -m bridge ...` from {config.baseline_dir} "
                "(BENCH_PIPELINE_BASELINE), namespace `<ns>-base`."
            ]
            if BASELINE in config.subjects
            else []
        ),
        "- vouchers/s: activated vouchers / (first RESERVED sent -> last activation). "
        "Latency: the driver's clock when READY got its 200 -> the Doshii record's "
        "`updatedAt` when the activation was applied (same clock, millisecond resolution).",
        "- CPU: utime+stime from /proc/PID/stat around each phase (the sandbox thread from "
        "/proc/PID/task/TID/stat, the driver is its process minus that thread); broker CPU is "
        "the `beam.smp` serving 127.0.0.1:5672 (other RabbitMQ nodes on the machine are not "
        "ours), so anything else using that broker meanwhile counts too. Medians are "
        "taken per row over the rounds, so a total's median need not be the sum of its rows'.",
        "",
    ]
    for title, headers, rows in _sections(result, machine.cpus):
        lines += [f"## {title}", "", report.markdown_table(headers, rows), ""]
    for title, items in _tail(result, machine.cpus):
        lines += [f"## {title}", "", *(f"- {item}" for item in items), ""]
    lines += ["## Phase notes", "", *(f"- {line}" for line in phase_notes(result.runs)), ""]
    return "\n".join(lines)


async def _phase(
    bench: PipelineBench,
    driver: Driver,
    subject: Subject,
    run: PhaseRun,
    load: Callable[[], Awaitable[float | None]],
    profile_dir: Path | None = None,
) -> PhaseRun:
    profiled = "" if profile_dir is None else f" (py-spy recording into {profile_dir})"
    print(f"{run.label}: starting{profiled}", flush=True)
    await bench.measure(driver, subject, run, load, profile_dir)
    result = run.result
    print(
        f"{run.label}: {result.sent:,} sent, {result.activated:,} activated, "
        f"{result.lost:,} lost, {result.dead:,} dead; {fmt(result.per_s, 1)} vouchers/s; "
        f"READY -> activated p50 {fmt(result.p50_ms, 1)} ms, p99 {fmt(result.p99_ms, 1)} ms",
        flush=True,
    )
    return run


def _new_run(subject: Subject, round_number: int, phase: str, name: str) -> PhaseRun:
    return PhaseRun(
        subject=subject.name,
        round_number=round_number,
        phase=phase,
        name=name,
        traces=[],
        cpu_ticks={},
        wall_s=0.0,
        offered_per_s=None,
        refusals={},
        spooled=0,
    )


async def _round(
    bench: PipelineBench, driver: Driver, subject: Subject, round_number: int
) -> list[PhaseRun]:
    """One subject's warm-up, throughput and fixed-rate phases."""
    config = bench.config
    runs = []
    if config.warmup:

        async def warmup() -> None:
            await closed_loop(driver, config.warmup, config.in_flight)

        run = _new_run(subject, round_number, "warm-up", "warm-up")
        runs.append(await _phase(bench, driver, subject, run, warmup))

    async def throughput() -> None:
        await closed_loop(driver, config.vouchers, config.in_flight)

    async def fixed_rate() -> float:
        return await open_loop(driver, config.rate_vouchers, config.rate_per_s)

    profile_dir = None
    if config.pyspy_dir is not None and round_number == 1:
        profile_dir = config.pyspy_dir / subject.name
    run = _new_run(subject, round_number, THROUGHPUT, config.throughput_name)
    runs.append(await _phase(bench, driver, subject, run, throughput, profile_dir))
    run = _new_run(subject, round_number, RATE, config.rate_name)
    runs.append(await _phase(bench, driver, subject, run, fixed_rate))
    return runs


async def _drive(bench: PipelineBench) -> list[PhaseRun]:
    """Every round, the subjects one after another, against the running processes."""
    amount_cents = value_to_cents(VOUCHER_VALUE, bench.settings.value_to_cents)
    connector = aiohttp.TCPConnector(limit=DRIVER_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=NOTIFY_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        driver = Driver(
            sandboxes=bench.sandboxes,
            thread=bench.thread,
            keys=KeyRing(bench.settings.key_secrets),
            session=session,
            notification_url=bench.subjects[0].ingress_url,
            amount_cents=amount_cents,
        )
        runs = []
        for round_number in range(1, bench.config.rounds + 1):
            for subject in bench.subjects:
                runs += await _round(bench, driver, subject, round_number)
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
        print(
            f"  namespace {bench.namespace}; starting an ingress and four workers for each of "
            f"{', '.join(config.subjects)}",
            flush=True,
        )
        await bench.start(stack)
        print(f"  {bench.pids_line()}", flush=True)
        runs = await _drive(bench)
        settings = bench.settings
    result = outcome(runs, config)
    print()
    print(render_text(result, machine.cpus))
    for run in result.runs:
        if run.profile:
            print(
                f"\npy-spy during {run.label}, {pyspy.SAMPLE_RATE_HZ} samples/s per process "
                "(% of that process's or thread's samples; the sampling perturbs the figures):"
            )
            print("\n".join(run.profile))
    if config.pyspy_dir is not None:
        print(f"\nprofiled run: {RESULTS_PATH} left as it was")
    else:
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_PATH.write_text(render_markdown(config, machine, settings, when, result))
        print(f"\nwritten to {RESULTS_PATH}")
    if any(run.result.lost or run.result.dead for run in runs):
        print("!!! vouchers were lost or dead-lettered: see above", file=sys.stderr)
        return EXIT_LOST
    return 0


def main() -> int:
    """Entry point for `python -m bench pipeline`: 0 when nothing was lost nor dead-lettered."""
    config = Config.from_env()
    if config.pyspy_dir is not None:
        for subject in config.subjects:
            (config.pyspy_dir / subject).mkdir(parents=True, exist_ok=True)
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
