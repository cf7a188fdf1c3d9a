"""The ingress benchmark: the project's ingress against three reference servers, under wrk.

All servers start once and stay up; each round loads them one at a time, in the order ingress,
naive, faststream, bare (on the one broker at 5672), then, on a local three-node cluster
(scripts/rabbitmq-cluster.sh, quorum queues on all three nodes), ingress@cluster, naive@cluster
and ingress@cluster+tls, with a short discarded warm-up before every measured run. After every
ingress run the reservations queue must hold exactly the notifications the ingress answered 200
to. Medians go to stdout and to bench/results/ingress-latest.md.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sys
import tempfile
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import cluster as bench_cluster
from bench import procstat, report, servers
from bench.broker import BrokerAdmin, namespace_queues
from bench.deps import Requirement
from bench.machine import Machine, describe
from bench.report import Run, StoredCheck, Summary, Target
from bench.servers import Probe, Server
from bench.wrk import WrkError, WrkResult, run_wrk, wrk_executable
from shared.keys import KeyRing
from shared.models import KeyClaims
from shared.settings import ENV_PREFIX, Settings, load_settings
from shared.topology import Names, Stage

REQUIREMENTS = (Requirement("faststream", (0, 7), "faststream[rabbit]>=0.7"),)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANCHORS_DIR = Path(__file__).resolve().parents[2] / "shared" / "anchors"
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "ingress-latest.md"
# The reference servers hard-code this broker; the ingress is pointed at the same one.
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
BROKER_PORT = 5672  # the port of AMQP_URL: its beam.smp is the broker whose CPU is read
ANCHOR_QUEUE = "anchor.vouchers.q"
INGRESS = report.SUBJECT
SERVER_ORDER = (INGRESS, report.NAIVE, "faststream", "bare")
CLUSTER_INGRESS = "ingress@cluster"
CLUSTER_NAIVE = "naive@cluster"
CLUSTER_TLS = "ingress@cluster+tls"
CLUSTER_ORDER = (CLUSTER_INGRESS, CLUSTER_NAIVE, CLUSTER_TLS)
# What the ratio table compares on the cluster: the targets' pair, and what TLS costs.
CLUSTER_PAIRS = ((CLUSTER_INGRESS, CLUSTER_NAIVE), (CLUSTER_TLS, CLUSTER_INGRESS))
ANCHOR_FILES = {"naive": "naive.py", "faststream": "faststream_peer.py", "bare": "bare.py"}
LOAD_SCRIPT = "post.lua"

# Five alternating rounds: on a shared or virtual machine one disturbed round must not decide a
# median by itself.
DEFAULT_ROUNDS = 5
DEFAULT_DURATION_S = 10
DEFAULT_CONNECTIONS = 32
WARMUP_S = 2
WRK_THREADS = 1
KEY_COUNT = 8
KEY_AMOUNT_CENTS = 11_000  # post.lua's vouchers have value 110
# Requests still in flight when wrk stops are answered a moment later; wait for them.
SETTLE_POLL_S = 0.25
SETTLE_TIMEOUT_S = 10.0
ANCHOR_SETTLE_S = 0.5
# A quorum queue's count can trail its last confirm by a moment; look again before crying foul.
STORED_RECHECKS = 10
STORED_RECHECK_S = 0.2
EXIT_WRK_FAILED = 2
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

_OUTCOME_RE = re.compile(
    r'^bridge_ingress_requests_total\{outcome="([a-z_]+)"\} ([0-9.eE+-]+)$', re.MULTILINE
)


@dataclass(frozen=True)
class Config:
    """The knobs, from BENCH_* environment variables."""

    rounds: int
    duration_s: int
    connections: int
    anchors_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """BENCH_ROUNDS, BENCH_DURATION_S, BENCH_CONNECTIONS, BENCH_ANCHORS_DIR; exit if bad."""

        def positive(name: str, default: int) -> int:
            text = env.get(name, str(default))
            if not text.isdigit() or int(text) < 1:
                raise SystemExit(f"{name} must be a positive integer, not {text!r}")
            return int(text)

        anchors_dir = Path(env.get("BENCH_ANCHORS_DIR", str(DEFAULT_ANCHORS_DIR)))
        missing = [
            f for f in (*ANCHOR_FILES.values(), LOAD_SCRIPT) if not (anchors_dir / f).is_file()
        ]
        if missing:
            raise SystemExit(f"{anchors_dir} lacks {', '.join(missing)} (set BENCH_ANCHORS_DIR)")
        return cls(
            rounds=positive("BENCH_ROUNDS", DEFAULT_ROUNDS),
            duration_s=positive("BENCH_DURATION_S", DEFAULT_DURATION_S),
            connections=positive("BENCH_CONNECTIONS", DEFAULT_CONNECTIONS),
            anchors_dir=anchors_dir,
        )

    @property
    def load_script(self) -> Path:
        """The wrk script that posts a fresh signed voucher with every request."""
        return self.anchors_dir / LOAD_SCRIPT


def ingress_settings(namespace: str, port: int, spool_dir: Path) -> dict[str, Any]:
    """The settings the benchmark pins for the ingress; the rest are defaults (or BRIDGE_* env)."""
    return {
        "amqp_url": AMQP_URL,
        "namespace": namespace,
        "key_secrets": secrets.token_urlsafe(32),
        "jackpot_api_key": "bench-jackpot-api-key",
        "doshii_client_id": "bench-doshii-client",
        "doshii_client_secret": "bench-doshii-client-secret",
        "http_host": "127.0.0.1",
        "http_port": port,
        "spool_dir": spool_dir,
        # As in production: info-level JSON logs (to a file here) and metrics on.
        "log_level": "info",
        "log_json": "true",
    }


def mint_keys(settings: Settings, count: int = KEY_COUNT) -> list[str]:
    """Real notificationKeys, each for a different Doshii request, signed as the ingress expects."""
    ring = KeyRing(settings.key_secrets)
    return [
        ring.mint(
            KeyClaims(
                location_id="bench-location",
                request_id=f"bench-request-{index}",
                amount_cents=KEY_AMOUNT_CENTS,
            )
        )
        for index in range(count)
    ]


def parse_outcomes(metrics_text: str) -> dict[str, int]:
    """The ingress's request counter by outcome, from its /metrics text."""
    return {match[1]: int(float(match[2])) for match in _OUTCOME_RE.finditer(metrics_text)}


def _ingress_argv() -> list[str]:
    bridge = Path(sys.executable).parent / "bridge"
    if bridge.is_file():
        return [str(bridge), "ingress"]
    return [sys.executable, "-m", "bridge", "ingress"]


class IngressBench:
    """One benchmark run: the servers, the broker chores and the measurements."""

    def __init__(
        self,
        config: Config,
        workdir: Path,
        admin: BrokerAdmin,
        cluster: bench_cluster.BenchCluster | None = None,
        cluster_admin: BrokerAdmin | None = None,
    ) -> None:
        self.config = config
        self.admin = admin
        self.cluster_admin = cluster_admin
        self.namespace = f"bench-{secrets.token_hex(4)}"
        ingress_port = servers.free_port()
        values = ingress_settings(self.namespace, ingress_port, workdir / "spool")
        self.settings = load_settings(**values)
        self.keys = ",".join(mint_keys(self.settings))
        self.queues = namespace_queues(self.namespace, tiers_s=self.settings.retry_tiers_s)
        self.reservations = Names(self.namespace).queue(Stage.RESERVATIONS)
        env = {f"{ENV_PREFIX}{name.upper()}": str(value) for name, value in values.items()}
        self.servers = [
            Server(
                name=INGRESS,
                argv=_ingress_argv(),
                env={**os.environ, **env},
                port=ingress_port,
                log_path=workdir / "ingress.log",
                probe=Probe.READYZ,
                cwd=REPO,
            )
        ]
        for name in SERVER_ORDER[1:]:
            port = servers.free_port()
            self.servers.append(
                Server(
                    name=name,
                    argv=[sys.executable, str(config.anchors_dir / ANCHOR_FILES[name]), str(port)],
                    env=dict(os.environ),
                    port=port,
                    log_path=workdir / f"{name}.log",
                    probe=Probe.ANY_ANSWER,
                    cwd=REPO,
                )
            )
        self.admins = {server.name: admin for server in self.servers}
        if cluster is not None and cluster_admin is not None:
            self._add_cluster_servers(cluster, cluster_admin, workdir, env)
        self.order = [server.name for server in self.servers]
        # Every beam.smp: the one broker and, when it runs, the cluster's three nodes.
        self.broker_pids = procstat.pids_named(procstat.BROKER_COMM)
        self.runs: list[Run] = []
        self.checks: list[StoredCheck] = []

    def _add_cluster_servers(
        self,
        cluster: bench_cluster.BenchCluster,
        admin: BrokerAdmin,
        workdir: Path,
        env: dict[str, str],
    ) -> None:
        """The ingress and naive on the cluster, and the ingress over TLS to it."""
        variants = {
            CLUSTER_INGRESS: {f"{ENV_PREFIX}AMQP_URL": cluster.urls},
            CLUSTER_TLS: {
                f"{ENV_PREFIX}AMQP_URL": cluster.tls_urls,
                f"{ENV_PREFIX}AMQP_CA_FILE": str(cluster.ca_file),
            },
        }
        for name in CLUSTER_ORDER:
            port = servers.free_port()
            if name == CLUSTER_NAIVE:
                anchor = str(self.config.anchors_dir / ANCHOR_FILES[report.NAIVE])
                argv = [sys.executable, "-m", "bench.anchor_on", cluster.url(1), anchor, str(port)]
                server_env, probe = dict(os.environ), Probe.ANY_ANSWER
            else:
                argv = _ingress_argv()
                server_env = {
                    **os.environ,
                    **env,
                    **variants[name],
                    f"{ENV_PREFIX}HTTP_PORT": str(port),
                    f"{ENV_PREFIX}SPOOL_DIR": str(workdir / f"spool-{name}"),
                }
                probe = Probe.READYZ
            self.servers.append(
                Server(
                    name=name,
                    argv=argv,
                    env=server_env,
                    port=port,
                    log_path=workdir / f"{name}.log",
                    probe=probe,
                    cwd=REPO,
                )
            )
            self.admins[name] = admin

    async def start(self, stack: AsyncExitStack) -> None:
        """Start every server (each stopped by `stack`), then wait until all of them answer."""
        for admin in {id(a): a for a in self.admins.values()}.values():
            stack.push_async_callback(admin.purge, ANCHOR_QUEUE)
            stack.push_async_callback(
                admin.delete_namespace, self.namespace, tiers_s=self.settings.retry_tiers_s
            )
        for server in self.servers:
            stack.push_async_callback(servers.stop, server)
            await servers.start(server)
        await asyncio.gather(*(servers.wait_ready(server) for server in self.servers))

    async def _outcomes(self, session: aiohttp.ClientSession, server: Server) -> dict[str, int]:
        async with session.get(f"{server.url}metrics") as response:
            response.raise_for_status()
            return parse_outcomes(await response.text())

    async def _settle(self, session: aiohttp.ClientSession, server: Server) -> dict[str, int]:
        """Wait until the ingress's request counters stop moving; return them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT_S
        previous = await self._outcomes(session, server)
        while True:
            await asyncio.sleep(SETTLE_POLL_S)
            current = await self._outcomes(session, server)
            if current == previous or loop.time() > deadline:
                return current
            previous = current

    async def _drain(self, server: Server) -> None:
        admin = self.admins[server.name]
        if _is_ingress(server.name):
            await admin.purge_all(self.queues)
        else:
            await admin.purge(ANCHOR_QUEUE)

    async def _load(self, server: Server, duration_s: int) -> WrkResult:
        return await run_wrk(
            server.url,
            script=self.config.load_script,
            keys=self.keys if _is_ingress(server.name) else "bench",
            duration_s=duration_s,
            connections=self.config.connections,
            threads=WRK_THREADS,
        )

    async def measure(
        self, session: aiohttp.ClientSession, server: Server, round_number: int
    ) -> Run:
        """Warm up, drain, then one measured wrk run with CPU read around it."""
        is_ingress = _is_ingress(server.name)
        await self._drain(server)
        await self._load(server, WARMUP_S)
        before: dict[str, int] = {}
        if is_ingress:
            before = await self._settle(session, server)
        else:
            await asyncio.sleep(ANCHOR_SETTLE_S)
        await self._drain(server)
        server_ticks = procstat.cpu_ticks(server.pid)
        broker_ticks = procstat.total_cpu_ticks(self.broker_pids)
        result = await self._load(server, self.config.duration_s)
        run = Run(
            server=server.name,
            round_number=round_number,
            wrk=result,
            server_cpu_ticks=procstat.cpu_ticks(server.pid) - server_ticks,
            broker_cpu_ticks=procstat.total_cpu_ticks(self.broker_pids) - broker_ticks,
        )
        if is_ingress:
            after = await self._settle(session, server)
            self.checks.append(await self._check_stored(run, before, after))
        else:
            await asyncio.sleep(ANCHOR_SETTLE_S)
        await self._drain(server)
        return run

    async def _check_stored(
        self, run: Run, before: dict[str, int], after: dict[str, int]
    ) -> StoredCheck:
        def delta(outcome: str) -> int:
            return after.get(outcome, 0) - before.get(outcome, 0)

        expected = delta("accepted")
        admin = self.admins[run.server]
        stored = await admin.count(self.reservations)
        for _ in range(STORED_RECHECKS):
            if stored == expected:
                break
            await asyncio.sleep(STORED_RECHECK_S)
            stored = await admin.count(self.reservations)
        return StoredCheck(
            round_number=run.round_number,
            stored=stored,
            server_ok_answers=expected + delta("spooled"),
            server_spooled=delta("spooled"),
            wrk_accepted=run.wrk.accepted,
            connections=self.config.connections,
            server=run.server,
        )

    async def rounds(self) -> None:
        """Every round: each server in turn, one at a time."""
        async with aiohttp.ClientSession() as session:
            for round_number in range(1, self.config.rounds + 1):
                for server in self.servers:
                    run = await self.measure(session, server, round_number)
                    self.runs.append(run)
                    print(_progress(run), flush=True)
                    if _is_ingress(server.name):
                        check = self.checks[-1]
                        print(f"  {check.line()}", flush=True)
                        if not check.ok:
                            print(f"!!! {check.line()}", file=sys.stderr, flush=True)


def _is_ingress(name: str) -> bool:
    return name.startswith(INGRESS)


def _progress(run: Run) -> str:
    wrk = run.wrk
    return (
        f"round {run.round_number} {run.server:<19} {wrk.accepted_per_s:8,.0f} accepted/s  "
        f"p50 {wrk.latency_p50_ms:6.2f} ms  p99 {wrk.latency_p99_ms:6.2f} ms  "
        f"server {run.server_cpu_us_per_accepted:5,.0f} µs  "
        f"broker {run.broker_cpu_us_per_accepted:5,.0f} µs per accepted  "
        f"(non-2xx {wrk.non_2xx}, socket errors {wrk.socket_errors})"
    )


def _load_line(config: Config, order: list[str] | None = None) -> str:
    return (
        f"wrk -t{WRK_THREADS} -c{config.connections} -d{config.duration_s}s --latency "
        f"-s {config.load_script}; {WARMUP_S} s warm-up before each run (discarded); "
        f"{config.rounds} round(s) of {', '.join(order or SERVER_ORDER)}; medians over the rounds"
    )


def _all_ratio_rows(summaries: list[Summary]) -> list[list[str]]:
    one_node = [s for s in summaries if s.server in SERVER_ORDER]
    return [*report.ratio_rows(one_node), *report.ratio_rows(summaries, CLUSTER_PAIRS)]


def render_text(summaries: list[Summary], targets: list[Target], checks: list[StoredCheck]) -> str:
    """The summary printed at the end: medians, ratios, targets, stored checks."""
    parts = [
        "Medians per server (CPU per accepted request):",
        report.text_table(report.SUMMARY_HEADERS, report.summary_rows(summaries)),
        "",
        "The ingress's medians divided by each other server's:",
        report.text_table(report.RATIO_HEADERS, _all_ratio_rows(summaries)),
        "",
        "Targets:",
        *(f"  {target.line()}" for target in targets),
        "",
        "Stored = accepted:",
        *(f"  {check.line()}" for check in checks),
    ]
    return "\n".join(parts)


def render_markdown(
    config: Config,
    machine: Machine,
    when: datetime,
    runs: list[Run],
    summaries: list[Summary],
    targets: list[Target],
    checks: list[StoredCheck],
) -> str:
    """The results file: when and where, medians, ratios, targets, checks and every run."""
    lines = [
        "# Ingress benchmark",
        "",
        f"Measured {when:%Y-%m-%d %H:%M} UTC with `make bench` (`python -m bench ingress`).",
        "",
        *(f"- {line}" for line in machine.lines()),
        f"- load: {_load_line(config, [s.server for s in summaries])}",
        "- cluster rows: three local RabbitMQ nodes (scripts/rabbitmq-cluster.sh), quorum queues "
        "on all three; ingress@cluster+tls reaches them over amqps:// with host names checked.",
        "- CPU per accepted request: utime+stime (+ waited-for children) from /proc/PID/stat "
        "around the measured run, divided by the 2xx answers; broker CPU is the `beam.smp` "
        "serving 127.0.0.1:5672, so anything else using that broker meanwhile counts too.",
        "",
        "## Medians per server",
        "",
        report.markdown_table(report.SUMMARY_HEADERS, report.summary_rows(summaries)),
        "",
        "## The ingress's medians divided by each other server's",
        "",
        report.markdown_table(report.RATIO_HEADERS, _all_ratio_rows(summaries)),
        "",
        "## Targets",
        "",
        *(f"- {target.line()}" for target in targets),
        "",
        "## Stored = accepted",
        "",
        *(f"- {check.line()}" for check in checks),
        "",
        "## Every run",
        "",
        report.markdown_table(report.RUN_HEADERS, report.run_rows(runs)),
        "",
    ]
    return "\n".join(lines)


async def _run(config: Config) -> int:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    wrk_executable()
    machine = describe()
    when = datetime.now(UTC)
    print(f"bench ingress: {_load_line(config)}", flush=True)
    for line in machine.lines():
        print(f"  {line}", flush=True)
    async with AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingress-")))
        admin = await BrokerAdmin.open(AMQP_URL)
        stack.push_async_callback(admin.close)
        print("  starting the local three-node cluster", flush=True)
        cluster, cluster_note = await asyncio.to_thread(bench_cluster.start)
        cluster_admin = None
        if cluster is None:
            print(f"  no cluster rows: {cluster_note}", flush=True)
        else:
            stack.callback(cluster.down)
            cluster_admin = await BrokerAdmin.open(cluster.url(1))
            stack.push_async_callback(cluster_admin.close)
        bench = IngressBench(config, workdir, admin, cluster, cluster_admin)
        if not bench.broker_pids:
            print("  warning: no beam.smp process found; broker CPU reads as 0", flush=True)
        print(f"  namespace {bench.namespace}; starting {len(bench.servers)} servers", flush=True)
        await bench.start(stack)
        await bench.rounds()
    summaries = report.summarize(bench.runs, bench.order)
    targets = report.evaluate_targets(summaries)
    targets += report.cluster_targets(summaries, CLUSTER_INGRESS, CLUSTER_NAIVE)
    print()
    print(render_text(summaries, targets, bench.checks))
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        render_markdown(config, machine, when, bench.runs, summaries, targets, bench.checks)
    )
    print(f"\nwritten to {RESULTS_PATH}")
    if not all(check.ok for check in bench.checks):
        print("!!! the ingress did not store exactly what it accepted: see above", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    """Entry point for `python -m bench ingress`: 0 when every stored = accepted check held."""
    config = Config.from_env()
    try:
        return asyncio.run(_run(config))
    except WrkError as error:
        print(f"bench ingress: {error}", file=sys.stderr)
        return EXIT_WRK_FAILED
    except asyncio.CancelledError:
        print("bench ingress: stopped by SIGTERM; servers stopped", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print("bench ingress: interrupted; servers stopped", file=sys.stderr)
        return EXIT_SIGINT
