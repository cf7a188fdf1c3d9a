"""`python -m sandbox.demo`: the bridge's main job, end to end, on this one machine.

The demo process plays Jackpot and the POS (both sandboxes, in-process on loopback) and runs
`bridge run` as a real subprocess against the real RabbitMQ, in a namespace of its own:

    1. start the sandboxes, then `bridge run`, and wait until its ingress and workers are ready;
    2. open Doshii activation requests, mint their keys, reserve a Jackpot voucher for each;
    3. deliver every voucher concurrently: plain ones, one whose READY link has already expired
       (the worker renews it), one cancelled at Jackpot once confirmed, and one whose Doshii
       update first meets two 503s (played after the others, so the fault hits it alone);
    4. wait, bounded, until every Doshii request is final; print a table and where to look;
    5. stop `bridge run`, delete the namespace from the broker and stop the sandboxes.

Steps 2 to 4 are the story in `sandbox/story.py`, which `bridge sandbox --story` also plays
against a bridge deployed elsewhere (compose's demo profile).

Exit status 0 only when every voucher ended as expected and nothing was dead-lettered. The PDFs,
the bridge's log and its settings (`bridge.env`) stay under `var/demo-<namespace>/`. With
`--keep`, everything stays up after the table (metrics, `bridge dlq list`) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
import aiohttp

from ingress.app import NOTIFICATION_PATH
from ingress.doshii import DOSHII_WEBHOOK_PATH
from sandbox import till_demo
from sandbox.doshii import CARD_ACTIVATE, Webhook
from sandbox.server import Sandboxes, start_sandboxes
from sandbox.story import CASES, Row, Ticket, Timing, expected, play_story
from shared import topology
from shared.broker import connect
from shared.errors import BridgeError, SettingsError
from shared.ledger import Ledger, create_pool, schema_for
from shared.settings import ENV_PREFIX, Settings, load_settings
from workers import dlq

_T = TypeVar("_T")

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
NAMESPACE_PREFIX = "demo-"
NAMESPACE_RANDOM_BYTES = 3
# A demo secret: signs the notificationKeys of this run only (16 characters at least).
DEMO_KEY_SECRET = "demo-notification-key-secret-0123"
# Short delay tiers, so a retry waits seconds, not the production minutes.
RETRY_TIERS_S = (1, 2, 5)
DRAIN_TIMEOUT_S = 5
PARTNER_TIMEOUT_S = 5
# How long `bridge run` may take to answer 200 on both /readyz.
READY_TIMEOUT_S = 30.0
READY_POLL_S = 0.2
PROBE_TIMEOUT_S = 1.0
# Every voucher must be final (activated or cancelled) within this long of the first delivery.
DEADLINE_S = 45.0
PROGRESS_INTERVAL_S = 1.0
# Jackpot re-sends a refused notification for as long as the demo waits.
DEMO_TIMING = Timing(DEADLINE_S, DEADLINE_S, PROGRESS_INTERVAL_S)
# How long `bridge run` may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
CLEANUP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 15
MANAGEMENT_PORT = 15672
# Exit statuses of a run cut short: by Ctrl-C (SIGINT) or by SIGTERM, after cleaning up.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class DemoError(Exception):
    """The demo cannot go on; the message says why, for a person."""


@dataclass(frozen=True)
class Plan:
    """Where this run lives: its namespace, its ports and its folder under `var/`."""

    namespace: str
    http_port: int
    worker_http_port: int

    @property
    def run_dir(self) -> Path:
        return REPO_ROOT / "var" / self.namespace

    @property
    def pdf_dir(self) -> Path:
        return self.run_dir / "pdfs"

    @property
    def spool_dir(self) -> Path:
        return self.run_dir / "spool"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "bridge.log"

    @property
    def env_path(self) -> Path:
        return self.run_dir / "bridge.env"

    @property
    def ingress_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def worker_url(self) -> str:
        return f"http://{LOOPBACK}:{self.worker_http_port}"


@dataclass(frozen=True)
class Bridge:
    """`bridge run`, started as a child process writing its log to a file."""

    process: asyncio.subprocess.Process
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the log, to show why it did not come up."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"


# Setting up


def say(text: str = "") -> None:
    """A line of the report, on stdout."""
    print(text, flush=True)


def note(text: str) -> None:
    """A line of progress, on stderr."""
    print(text, file=sys.stderr, flush=True)


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(REPO_ROOT))
    return str(path)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on loopback right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def make_plan() -> Plan:
    """A fresh namespace and two free ports."""
    namespace = f"{NAMESPACE_PREFIX}{secrets.token_hex(NAMESPACE_RANDOM_BYTES)}"
    http_port, worker_http_port = free_ports(2)
    return Plan(namespace, http_port, worker_http_port)


def bridge_values(plan: Plan, sandboxes: Sandboxes) -> dict[str, str]:
    """The settings of this run's `bridge run`, by field name (BRIDGE_<NAME> in its env)."""
    return {
        **sandboxes.settings_overrides(),
        "namespace": plan.namespace,
        "key_secrets": DEMO_KEY_SECRET,
        "http_host": LOOPBACK,
        "http_port": str(plan.http_port),
        "worker_http_port": str(plan.worker_http_port),
        "jackpot_confirm": "api",
        "pdf_dir": str(plan.pdf_dir),
        "spool_dir": str(plan.spool_dir),
        "retry_tiers_s": ",".join(map(str, RETRY_TIERS_S)),
        "partner_timeout_s": str(PARTNER_TIMEOUT_S),
        "drain_timeout_s": str(DRAIN_TIMEOUT_S),
        "log_json": "true",
        "log_level": "info",
        # The run's ledger: a schema of its own in BRIDGE_DATABASE_URL's database.
        "database_schema": schema_for(plan.namespace),
        # The till's webhook: the ingress takes Doshii's card_activate with these credentials.
        "doshii_webhook_auth": DEMO_WEBHOOK_AUTH,
    }


def as_env(values: Mapping[str, str]) -> dict[str, str]:
    """`{"http_port": "1"}` as `{"BRIDGE_HTTP_PORT": "1"}`."""
    return {f"{ENV_PREFIX}{name.upper()}": value for name, value in values.items()}


def write_env_file(plan: Plan, values: Mapping[str, str]) -> None:
    """Save the run's BRIDGE_* variables, so `bridge dlq list` can be pointed at the namespace."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{name}={shlex.quote(value)}" for name, value in as_env(values).items()]
    plan.env_path.write_text("\n".join(lines) + "\n")


# `bridge run`


async def start_bridge(plan: Plan, values: Mapping[str, str]) -> Bridge:
    """Start `bridge run` with the run's settings on top of this process's environment."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **as_env(values)}
    with plan.log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "run",
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    return Bridge(process, plan.log_path)


async def answers_200(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether `GET url` answers 200 now."""
    try:
        async with session.get(url) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def wait_ready(bridge: Bridge, plan: Plan) -> float:
    """Wait until the ingress and the workers both answer 200 on /readyz; returns the seconds."""
    urls = (f"{plan.ingress_url}/readyz", f"{plan.worker_url}/readyz")
    loop = asyncio.get_running_loop()
    started = loop.time()
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            code = bridge.process.returncode
            if code is not None:
                raise DemoError(
                    f"`bridge run` exited with status {code} before it was ready. "
                    f"Last lines of {shown(bridge.log_path)}:\n{bridge.log_tail()}"
                )
            if all([await answers_200(session, url) for url in urls]):
                return loop.time() - started
            if loop.time() - started > READY_TIMEOUT_S:
                raise DemoError(
                    f"`bridge run` did not answer 200 on {' and '.join(urls)} within "
                    f"{READY_TIMEOUT_S:.0f} s. Last lines of {shown(bridge.log_path)}:\n"
                    f"{bridge.log_tail()}"
                )
            await asyncio.sleep(READY_POLL_S)


async def stop_bridge(bridge: Bridge) -> int:
    """SIGTERM, wait for the drain, kill if it takes too long; returns the exit status."""
    process = bridge.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            note(f"`bridge run` did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM: killed")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode if process.returncode is not None else -1


# Reporting

TABLE_HEADERS = (
    "case",
    "Doshii request",
    "coupon",
    "status",
    "amount",
    "retries",
    "expected",
    "ok",
    "PDF bytes",
    "PDF",
)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a dashed line under the headers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def cells(row: Row) -> list[str]:
    """A row of the table; every cell non-empty ("-" for nothing)."""
    ticket = row.ticket
    return [
        str(ticket.case.kind),
        ticket.request_id,
        ticket.coupon_id,
        row.status,
        row.amount,
        row.retries,
        expected(ticket),
        "NO" if row.problems else "ok",
        str(row.pdf_bytes) if row.pdf_bytes is not None else "-",
        shown(row.pdf_path) if row.pdf_path is not None else "-",
    ]


def print_rows(rows: Sequence[Row]) -> None:
    """The table, then what differed for each row that is not ok."""
    say(table(TABLE_HEADERS, [cells(row) for row in rows]))
    for row in rows:
        for problem in row.problems:
            say(f"  request {row.ticket.request_id} ({row.ticket.case.kind}): {problem}")
    say(
        "  retries: Doshii PUTs answered other than 200, signed links renewed at Jackpot, "
        "notifications Jackpot had to send again"
    )


async def dead_letters(settings: Settings) -> list[str]:
    """Print the namespace's dead letters; returns a problem per letter (or the failure)."""
    try:
        letters = await dlq.list_dead(settings)
    except (aio_pika.exceptions.AMQPError, OSError, BridgeError) as error:
        return [f"could not read the dead queue: {error}"]
    if not letters:
        say(f"dead letters in {topology.Names(settings.namespace).dead}: none")
        return []
    say(dlq.table(letters))
    return [f"dead-lettered: {letter.message_id} ({letter.reason})" for letter in letters]


async def management_answers(host: str) -> bool:
    """Whether something listens on the RabbitMQ management plugin's port."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, MANAGEMENT_PORT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def dashboard_hint(settings: Settings) -> str:
    """Where the RabbitMQ dashboard is, or how to turn it on."""
    host = urlsplit(settings.amqp_urls[0]).hostname or LOOPBACK
    url = f"http://{host}:{MANAGEMENT_PORT}"
    if await management_answers(host):
        return f"{url}  (queues named {settings.namespace}.*)"
    return (
        f"not enabled here; `rabbitmq-plugins enable rabbitmq_management`, then {url} (guest/guest)"
    )


async def print_where_to_look(plan: Plan, settings: Settings, keep: bool) -> None:
    """Pointers for a person: dashboard, metrics, log, PDFs, dead letters."""
    python = shown(Path(sys.executable))
    while_up = "while the demo runs" + ("" if keep else "; add --keep to hold it up")
    namespace_up = "until Ctrl-C" if keep else "needs the namespace, deleted at the end: use --keep"
    say()
    say("Where to look")
    say(f"  RabbitMQ dashboard: {await dashboard_hint(settings)}")
    say(f"  ingress metrics:    {plan.ingress_url}/metrics  ({while_up})")
    say(f"  worker metrics:     {plan.worker_url}/metrics  ({while_up})")
    say(f"  bridge log (JSON):  {shown(plan.log_path)}")
    say(f"  PDFs:               {shown(plan.pdf_dir)}/")
    say(
        f"  dead letters:       (set -a; . {shown(plan.env_path)}; {python} -m bridge "
        f"dlq list)  ({namespace_up})"
    )


async def hold_until_interrupted() -> None:
    """With --keep: wait for Ctrl-C, then let the clean-up run (SIGTERM cancels the demo)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    note("holding everything up (--keep): Ctrl-C to clean up and exit")
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


# Running


class NoteObserver:
    """Tells the story's progress on stderr, as lines of progress (`note`)."""

    def started(self, vouchers: int, deadline_s: float) -> None:
        """Delivery starts, with its deadline."""
        note(f"delivering {vouchers} vouchers (at most {deadline_s:.0f} s)")

    def progress(self, finished: int, vouchers: int, elapsed_s: float) -> None:
        """How many vouchers are final so far."""
        note(f"  {finished}/{vouchers} finished ({elapsed_s:.0f} s)")

    def stuck(self, ticket: Ticket, why: str) -> None:
        """A voucher still pending at the deadline."""
        note(f"STUCK {ticket.case.kind} request {ticket.request_id}: {why}")

    def delivered(self, finished: int, vouchers: int, elapsed_s: float) -> None:
        """How many vouchers ended, and how long delivery took."""
        note(f"  {finished}/{vouchers} finished in {elapsed_s:.1f} s")


async def exercise(plan: Plan, settings: Settings, sandboxes: Sandboxes, keep: bool) -> list[str]:
    """Deliver every case, wait, check and report; returns what differed from the expectation."""
    outcome = await play_story(
        sandboxes,
        settings,
        plan.ingress_url,
        timing=DEMO_TIMING,
        observer=NoteObserver(),
        pdf_dir=plan.pdf_dir,
    )
    say()
    print_rows(outcome.rows)
    problems = outcome.problems
    problems += await dead_letters(settings)
    problems += await show_status(plan, settings, sandboxes, outcome.rows)
    problems += await sell_at_the_till(plan, settings, sandboxes)
    await print_where_to_look(plan, settings, keep)
    if keep:
        await hold_until_interrupted()
    return problems


TILL_HEADERS = ("case", "Doshii request", "status", "amount / reason", "vouchers", "ok", "journey")
# The ingress's Basic credentials for Doshii's webhook, in this demo only.
DEMO_WEBHOOK_AUTH = "demo-doshii-key:demo-doshii-token-0123456789"


async def sell_at_the_till(plan: Plan, settings: Settings, sandboxes: Sandboxes) -> list[str]:
    """Sell cards at the Doshii sandbox's till: the bridge reserves each at Jackpot."""
    key, _, token = DEMO_WEBHOOK_AUTH.partition(":")
    sandboxes.jackpot.reserve_notification_url = f"{plan.ingress_url}{NOTIFICATION_PATH}"
    sandboxes.doshii.register_webhook(
        Webhook(CARD_ACTIVATE, f"{plan.ingress_url}{DOSHII_WEBHOOK_PATH}", key, token)
    )
    say()
    say("Cards sold at the till: Doshii card_activate -> intake -> Jackpot reservation -> ...")
    rows = await till_demo.sell(sandboxes, settings)
    say(
        table(
            TILL_HEADERS,
            [
                [
                    row.case.name,
                    row.request_id,
                    row.status,
                    row.outcome,
                    str(row.vouchers),
                    "ok" if row.problem is None else "NO",
                    row.journey,
                ]
                for row in rows
            ],
        )
    )
    return [f"till, {row.case.name}: {row.problem}" for row in rows if row.problem]


# How long the ledger may take to write the last steps down after the table is complete.
LEDGER_SETTLE_S = 15.0


def status_command(plan: Plan, ident: str) -> str:
    python = shown(Path(sys.executable))
    return f"(set -a; . {shown(plan.env_path)}; {python} -m bridge status {ident})"


async def show_status(
    plan: Plan, settings: Settings, sandboxes: Sandboxes, rows: Sequence[Row]
) -> list[str]:
    """`bridge status` for the first activated voucher, once the ledger has its activation."""
    activated = [row.ticket for row in rows if row.status == "activated"]
    if not activated:
        return []
    ticket = activated[0]
    async with Ledger.open(settings, max_size=1) as ledger:
        deadline = time.monotonic() + LEDGER_SETTLE_S
        while True:
            found = await ledger.find(ticket.coupon_id)
            if found and found[0]["state"] == "activated":
                break
            if time.monotonic() > deadline:
                return [
                    f"the ledger did not show {ticket.coupon_id} activated within "
                    f"{LEDGER_SETTLE_S:.0f} s"
                ]
            await asyncio.sleep(0.2)
    env = {**os.environ, **as_env(bridge_values(plan, sandboxes))}
    shown_status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "status",
        ticket.coupon_id,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await shown_status.communicate()
    say()
    say(f"Where is coupon {ticket.coupon_id}? `bridge status` reads the ledger:")
    say(f"  $ {status_command(plan, ticket.coupon_id)}")
    for line in output.decode(errors="replace").splitlines():
        say(f"  {line}")
    if shown_status.returncode != 0:
        return [f"`bridge status {ticket.coupon_id}` exited with {shown_status.returncode}"]
    return []


async def upgrade_ledger(settings: Settings) -> None:
    """`bridge db upgrade` for the run's own schema: the one step before first start."""
    pool = await create_pool(settings, max_size=1)
    try:
        await Ledger(pool).upgrade(settings.database_schema)
    finally:
        await pool.close()


async def drop_ledger(settings: Settings) -> None:
    pool = await create_pool(settings, max_size=1)
    try:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
    finally:
        await pool.close()


async def delete_namespace(settings: Settings) -> None:
    """Delete every exchange and queue of the run's namespace."""
    connection = await connect(settings, "demo cleanup")
    async with connection:
        channel = await connection.channel()
        await topology.delete(channel, settings.namespace, tiers_s=settings.retry_tiers_s)


async def run_to_end(cleanup: Coroutine[Any, Any, _T]) -> _T:
    """Await a clean-up to its end even when the demo is cancelled (Ctrl-C) meanwhile."""
    task = asyncio.ensure_future(cleanup)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def clean_up(bridge: Bridge, settings: Settings) -> list[str]:
    """Stop `bridge run`, then delete the namespace it declared; returns what went wrong."""
    problems: list[str] = []
    code = await stop_bridge(bridge)
    say(f"cleanup: `bridge run` stopped (exit status {code})")
    if code != 0:
        problems.append(f"`bridge run` exited with status {code} after SIGTERM")
    try:
        async with asyncio.timeout(CLEANUP_TIMEOUT_S):
            await delete_namespace(settings)
        say(f"cleanup: namespace {settings.namespace} deleted from the broker")
        await drop_ledger(settings)
        say(f"cleanup: ledger schema {settings.database_schema} dropped")
    except (aio_pika.exceptions.AMQPError, OSError, TimeoutError, BridgeError) as error:
        problem = (
            f"could not delete namespace {settings.namespace} or its ledger schema "
            f"({type(error).__name__}: "
            f"{error}); delete its {settings.namespace}.* queues and exchanges by hand"
        )
        say(f"cleanup: {problem}")
        problems.append(problem)
    return problems


async def close_sandboxes(sandboxes: Sandboxes) -> None:
    """Stop both sandboxes."""
    await sandboxes.close()
    say("cleanup: sandboxes stopped")


def print_header(plan: Plan, sandboxes: Sandboxes) -> None:
    """What this run is and where its pieces listen."""
    say("voucher-bridge demo: Jackpot -> ingress -> RabbitMQ -> workers -> Doshii")
    say(f"namespace: {plan.namespace}")
    say(f"  Jackpot sandbox: {sandboxes.jackpot_url}   Doshii sandbox: {sandboxes.doshii_url}")
    say(f"  ingress: {plan.ingress_url}   worker status: {plan.worker_url}")
    say(f"  bridge log: {shown(plan.log_path)}")


def print_verdict(problems: Sequence[str], tickets: int, runtime_s: float) -> None:
    """The last line(s): OK, or FAILED with every difference."""
    say()
    if not problems:
        say(
            f"RESULT: OK - all {tickets} vouchers ended as expected, nothing dead-lettered "
            f"({runtime_s:.1f} s)"
        )
        return
    say(f"RESULT: FAILED - {len(problems)} difference(s) ({runtime_s:.1f} s):")
    for problem in problems:
        say(f"  - {problem}")


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the demo like Ctrl-C does, so its clean-up still runs."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


async def with_bridge(
    plan: Plan, values: Mapping[str, str], sandboxes: Sandboxes, keep: bool
) -> list[str]:
    """Start `bridge run`, exercise it, then stop it and delete its namespace, whatever happens."""
    settings = load_settings(**values)
    await upgrade_ledger(settings)
    note(f"ledger schema {settings.database_schema} upgraded (`bridge db upgrade`)")
    bridge = await start_bridge(plan, values)
    problems: list[str] = []
    try:
        note(f"started `bridge run` (pid {bridge.process.pid}); waiting for /readyz")
        ready_s = await wait_ready(bridge, plan)
        note(f"`bridge run` ready in {ready_s:.1f} s")
        problems += await exercise(plan, settings, sandboxes, keep)
    finally:
        problems += await run_to_end(clean_up(bridge, settings))
    return problems


async def run_demo(keep: bool) -> int:
    """The whole demo; returns the exit status. Cleans up whatever happens, Ctrl-C included."""
    started = time.monotonic()
    cancel_on_sigterm()
    plan = make_plan()
    sandboxes = await start_sandboxes(LOOPBACK)
    try:
        values = bridge_values(plan, sandboxes)
        write_env_file(plan, values)
        print_header(plan, sandboxes)
        problems = await with_bridge(plan, values, sandboxes, keep)
    finally:
        await run_to_end(close_sandboxes(sandboxes))
    print_verdict(problems, len(CASES), time.monotonic() - started)
    return 1 if problems else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: only `--keep`."""
    top = argparse.ArgumentParser(
        prog="python -m sandbox.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "--keep",
        action="store_true",
        help="after the table, keep everything running until Ctrl-C (metrics, dlq list)",
    )
    return top.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo: 0 when every voucher ended as expected, 1 otherwise, 130/143 if stopped."""
    args = parse_args(argv)
    try:
        return asyncio.run(run_demo(args.keep))
    except KeyboardInterrupt:
        note("interrupted (Ctrl-C): cleaned up")
        return INTERRUPTED_EXIT_CODE
    except asyncio.CancelledError:
        note("terminated (SIGTERM): cleaned up")
        return TERMINATED_EXIT_CODE
    except (DemoError, SettingsError) as error:
        note(f"demo failed: {error}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
