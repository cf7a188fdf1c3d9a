"""The till benchmark: cards sold at the Doshii sandbox, each followed until its card is final.

Every process its own, as in production, the ledger on: `bridge ingress` (Jackpot's and Doshii's
webhooks), `bridge worker intake|reservations|pdfs|lifecycle|doshii|ledger`, RabbitMQ and
PostgreSQL. This process is the till: it hosts both sandboxes in a thread of their own, sells a
card (a pending Doshii request and its `card_activate` to the ingress, retried like Doshii),
and waits until Doshii's request is activated or cancelled. The Jackpot sandbox reserves when
the intake asks and notifies the ingress as Jackpot does; nothing else drives the chain.

Two phases after a warm-up: closed loop (BENCH_TILL_SALES sales, BENCH_TILL_IN_FLIGHT at a time)
for sales/s, and BENCH_TILL_RATE sales/s for BENCH_TILL_RATE_S seconds for sale -> activated
latency. CPU per sale per process from /proc; sent = activated + cancelled + dead + lost.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench import procstat, servers
from bench.broker import BrokerAdmin
from bench.pipeline_stats import percentile
from bench.report import Target
from bench.sandbox_thread import SandboxThread
from bench.servers import Probe, Server
from ingress.doshii import DOSHII_WEBHOOK_PATH
from sandbox.doshii import CARD_ACTIVATE, Status, Webhook
from sandbox.server import Sandboxes
from shared.ledger import Ledger, create_pool, schema_for
from shared.settings import ENV_PREFIX, Settings, load_settings
from workers import dlq

REPO = Path(__file__).resolve().parents[1]
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "till-latest.md"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
BROKER_PORT = 5672
LOOPBACK = "127.0.0.1"
ROLES = ("intake", "reservations", "pdfs", "lifecycle", "doshii", "ledger")
WEBHOOK_KEY = "bench-doshii-key"
SALE_CENTS = 2500
# A sale not final after this long is counted lost (the intake deadline is 120 s).
SALE_TIMEOUT_S = 150.0
POSTGRES_COMM = "postgres"
TARGET_MIN_SALES_PER_S = 200.0
TARGET_MAX_P99_MS = 500.0
DRIVER = "till (driver, sandboxes)"
BROKER = "broker (beam.smp)"
POSTGRES = "PostgreSQL"


@dataclass(frozen=True)
class Config:
    sales: int
    in_flight: int
    rate_per_s: int
    rate_s: int
    warmup: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        def number(name: str, default: int) -> int:
            text = env.get(name, str(default))
            if not text.isdigit() or int(text) < 1:
                raise SystemExit(f"{name}: must be a whole number, 1 or more, not {text!r}")
            return int(text)

        return cls(
            sales=number("BENCH_TILL_SALES", 2000),
            in_flight=number("BENCH_TILL_IN_FLIGHT", 64),
            rate_per_s=number("BENCH_TILL_RATE", 50),
            rate_s=number("BENCH_TILL_RATE_S", 15),
            warmup=number("BENCH_TILL_WARMUP", 100),
        )


@dataclass
class Phase:
    name: str
    sent: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    endings: dict[str, int] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    dead: int = 0

    @property
    def per_s(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def lost(self) -> int:
        final = self.endings.get("activated", 0) + self.endings.get("cancelled", 0)
        return self.sent - final - self.dead


class Till:
    """Sells cards on the sandboxes' loop and times each until Doshii's request is final."""

    def __init__(self, thread: SandboxThread, sandboxes: Sandboxes) -> None:
        self.thread = thread
        self.sandboxes = sandboxes

    async def _sale(self) -> tuple[str, float, str]:
        doshii = self.sandboxes.doshii
        request_id = doshii.sell_card(amount_cents=SALE_CENTS)
        started = time.perf_counter()
        doshii.start_delivery(request_id)
        try:
            status = await doshii.wait_for_status(
                request_id, Status.ACTIVATED, Status.CANCELLED, timeout_s=SALE_TIMEOUT_S
            )
        except TimeoutError:
            status = "lost"
        return request_id, (time.perf_counter() - started) * 1000, str(status)

    async def sale(self) -> tuple[str, float, str]:
        return await self.thread.run(self._sale())


async def closed_loop(till: Till, phase: Phase, count: int, in_flight: int) -> None:
    queue = iter(range(count))

    async def seller() -> None:
        for _ in queue:
            _, ms, status = await till.sale()
            phase.sent += 1
            phase.latencies_ms.append(ms)
            phase.endings[status] = phase.endings.get(status, 0) + 1

    await asyncio.gather(*(seller() for _ in range(in_flight)))


async def open_loop(till: Till, phase: Phase, rate_per_s: int, seconds: int) -> None:
    tasks = []
    started = time.perf_counter()
    for number in range(rate_per_s * seconds):
        delay = started + number / rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(till.sale()))
    for _, ms, status in await asyncio.gather(*tasks):
        phase.sent += 1
        phase.latencies_ms.append(ms)
        phase.endings[status] = phase.endings.get(status, 0) + 1


def values(namespace: str, sandboxes: Sandboxes) -> dict[str, str]:
    return {
        **sandboxes.settings_overrides(),
        "amqp_url": AMQP_URL,
        "namespace": namespace,
        "key_secrets": secrets.token_urlsafe(32),
        "http_host": LOOPBACK,
        "log_level": "info",
        "log_json": "true",
        "database_schema": schema_for(namespace),
        "doshii_webhook_auth": f"{WEBHOOK_KEY}:{secrets.token_urlsafe(24)}",
    }


def as_env(items: Mapping[str, str]) -> dict[str, str]:
    return {f"{ENV_PREFIX}{name.upper()}": value for name, value in items.items()}


def bridge_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", *args]


def make_servers(workdir: Path, settings_values: Mapping[str, str]) -> list[Server]:
    env = {**os.environ, **as_env(settings_values)}
    made = []
    for role in ("ingress", *ROLES):
        port = servers.free_port()
        port_name = "http_port" if role == "ingress" else "worker_http_port"
        argv = bridge_argv("ingress") if role == "ingress" else bridge_argv("worker", role)
        made.append(
            Server(
                name=role if role == "ingress" else f"worker {role}",
                argv=argv,
                env={**env, **as_env({port_name: str(port)})},
                port=port,
                log_path=workdir / f"{role}.log",
                probe=Probe.READYZ,
                cwd=REPO,
            )
        )
    return made


Ticks = dict[str, int]


def snapshot(processes: Sequence[Server], broker_pids: list[int]) -> Ticks:
    """CPU ticks so far of each bridge process, this process, the broker and PostgreSQL."""
    ticks = {server.name: procstat.cpu_ticks(server.pid) for server in processes}
    ticks[DRIVER] = procstat.cpu_ticks(os.getpid())
    ticks[BROKER] = procstat.total_cpu_ticks(broker_pids)
    # Backends that ended meanwhile count through the postmaster's reaped-children time.
    ticks[POSTGRES] = procstat.total_cpu_ticks(procstat.pids_named(POSTGRES_COMM))
    return ticks


def per_sale_ms(before: Ticks, after: Ticks, sales: int) -> dict[str, float]:
    tick_ms = 1000 / procstat.CLOCK_TICKS_PER_S
    return {name: (after[name] - before[name]) * tick_ms / max(sales, 1) for name in after}


PHASE_HEADER = (
    "| phase | sales | sales/s | sale -> final p50 ms | p99 ms | activated | cancelled "
    "| dead | lost |"
)


def phase_line(phase: Phase) -> str:
    p50 = percentile(phase.latencies_ms, 0.5)
    p99 = percentile(phase.latencies_ms, 0.99)
    activated = phase.endings.get("activated", 0)
    cancelled = phase.endings.get("cancelled", 0)
    return (
        f"| {phase.name} | {phase.sent:,} | {phase.per_s:.1f} | {p50:.1f} | {p99:.1f} | "
        f"{activated:,} | {cancelled:,} | {phase.dead} | {phase.lost} |"
    )


def render(config: Config, phases: Sequence[Phase], settings: Settings) -> tuple[str, list[Target]]:
    """The report (markdown) and the issue's targets."""
    throughput, rate = phases
    lines = [
        "# Till benchmark: card sold -> activated",
        "",
        f"Load: closed loop {config.sales} sales, {config.in_flight} in flight; then "
        f"{config.rate_per_s} sales/s for {config.rate_s} s. Every process its own, the ledger "
        f"on (journal linger {settings.journal_linger_s} s).",
        "",
        PHASE_HEADER,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(phase_line(phase) for phase in phases),
        "",
        "CPU ms per sale (closed loop):",
        "",
        "| process | ms |",
        "|---|---:|",
    ]
    own = 0.0
    for name, ms in throughput.cpu_ms.items():
        lines.append(f"| {name} | {ms:.2f} |")
        if name == "ingress" or name.startswith("worker "):
            own += ms
    lines.append(f"| bridge's processes (ingress + workers) | {own:.2f} |")
    lines.append(f"| everything above | {sum(throughput.cpu_ms.values()):.2f} |")
    p99 = percentile(rate.latencies_ms, 0.99)
    lost = throughput.lost + rate.lost
    targets = [
        Target(
            f"sales/s end to end >= {TARGET_MIN_SALES_PER_S:g}",
            f"{throughput.per_s:.1f}",
            throughput.per_s >= TARGET_MIN_SALES_PER_S,
        ),
        Target(
            f"p99 sale -> final <= {TARGET_MAX_P99_MS:g} ms at {config.rate_per_s}/s",
            f"{p99:.1f} ms",
            p99 <= TARGET_MAX_P99_MS,
        ),
        Target("lost 0", f"{lost}", lost == 0),
    ]
    lines += ["", "Targets:", "", *(f"- {t.line()}" for t in targets)]
    return "\n".join(lines) + "\n", targets


async def _phases(config: Config, till: Till, processes: Sequence[Server]) -> list[Phase]:
    broker_pids = procstat.broker_pids(BROKER_PORT)
    runs: list[tuple[str, Callable[[Phase], Awaitable[None]]]] = [
        ("closed loop", lambda p: closed_loop(till, p, config.sales, config.in_flight)),
        (
            f"{config.rate_per_s}/s",
            lambda p: open_loop(till, p, config.rate_per_s, config.rate_s),
        ),
    ]
    phases = []
    for name, go in runs:
        phase = Phase(name)
        before = snapshot(processes, broker_pids)
        started = time.perf_counter()
        await go(phase)
        phase.seconds = time.perf_counter() - started
        phase.cpu_ms = per_sale_ms(before, snapshot(processes, broker_pids), phase.sent)
        print(f"  {name}: {phase.sent} sales, {phase.per_s:.1f}/s, {phase.endings}", flush=True)
        phases.append(phase)
    return phases


async def _run(config: Config) -> int:
    thread = SandboxThread(LOOPBACK)
    sandboxes = thread.start()
    namespace = f"bench-till-{secrets.token_hex(3)}"
    workdir = REPO / "var" / namespace
    items = {
        **values(namespace, sandboxes),
        "pdf_dir": str(workdir / "pdfs"),
        "spool_dir": str(workdir / "spool"),
    }
    settings = load_settings(**items)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    pool = await create_pool(settings, max_size=1)
    try:
        await Ledger(pool).upgrade(settings.database_schema)
        processes = make_servers(workdir, items)
        async with AsyncExitStack() as stack:
            for server in processes:
                stack.push_async_callback(servers.stop, server)
                await servers.start(server)
            await asyncio.gather(*(servers.wait_ready(server) for server in processes))
            await thread.run(wire(sandboxes, settings, processes[0].port))
            till = Till(thread, sandboxes)
            print(f"till benchmark {namespace}: warm-up {config.warmup} sales", flush=True)
            await closed_loop(till, Phase("warm-up"), config.warmup, config.in_flight)
            phases = await _phases(config, till, processes)
            phases[0].dead = len(await dlq.list_dead(settings))
        text, targets = render(config, phases, settings)
        print(text, flush=True)
        await asyncio.to_thread(RESULTS_PATH.write_text, text)
        print(f"written to {RESULTS_PATH.relative_to(REPO)}", flush=True)
        return 0 if targets[-1].passed else 1
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
        await pool.close()
        admin = await BrokerAdmin.open(AMQP_URL)
        try:
            await admin.delete_namespace(namespace, tiers_s=settings.retry_tiers_s)
        finally:
            await admin.close()
        thread.stop()


async def wire(sandboxes: Sandboxes, settings: Settings, ingress_port: int) -> None:
    """Point Jackpot's notifications and Doshii's webhook at the ingress (the sandboxes' loop)."""
    base = f"http://{LOOPBACK}:{ingress_port}"
    key, _, token = settings.doshii_webhook_auth[0].get_secret_value().partition(":")
    sandboxes.jackpot.reserve_notification_url = f"{base}/notifications/jackpot/reserve"
    sandboxes.doshii.register_webhook(
        Webhook(CARD_ACTIVATE, f"{base}{DOSHII_WEBHOOK_PATH}", key, token)
    )


def main() -> int:
    config = Config.from_env()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(config))
