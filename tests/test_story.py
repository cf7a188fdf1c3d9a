"""`bridge sandbox --story`: the demo's story told by the sandbox process to a separate bridge.

The end-to-end test runs two subprocesses, as compose's demo profile does: `bridge run` (the
ingress and every worker) pointed at the sandbox's ports, and `bridge sandbox --story` pointed at
the ingress. It reads the sandbox's JSON log until two stories have been told, checks every
voucher line and the verdicts, then stops both with SIGTERM. The `broker` fixture declares the
test's namespace and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from structlog.testing import capture_logs

from bridge import cli
from ingress.app import NOTIFICATION_PATH
from sandbox.demo import as_env, free_ports
from sandbox.doshii import DOSHII_BASE_PATH
from sandbox.server import (
    DEFAULT_DOSHII_CLIENT_ID,
    DEFAULT_DOSHII_CLIENT_SECRET,
    DEFAULT_JACKPOT_API_KEY,
    start_sandboxes,
)
from sandbox.story import (
    CASES,
    FAILED_VERDICT,
    OK_VERDICT,
    Kind,
    Timing,
    money,
    tell_stories,
    tell_story,
    wait_for_ingress,
)
from shared.ledger import schema_for
from shared.models import value_to_cents
from shared.settings import ENV_PREFIX, Settings
from shared.topology import Names
from tests.conftest import AMQP_URL, DATABASE_URL, TEST_SECRETS, TEST_TIERS_S
from tests.test_deploy import REQUIRED_FOR_TESTS, _image_env, _resolve

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
# Stories to wait for: the first, and one replayed by --story-repeat-s.
STORIES = 2
REPEAT_S = 2
STORY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.2
TAIL_LINES = 30

pytestmark = pytest.mark.timeout(STORY_TIMEOUT_S + 2 * STOP_TIMEOUT_S + 15)


@dataclass(frozen=True)
class Ports:
    """Where this test's processes listen."""

    http: int
    worker_http: int
    jackpot: int
    doshii: int

    @property
    def ingress_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http}"


@dataclass
class Child:
    """A subprocess writing its output to a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        lines = self.text().splitlines()[-TAIL_LINES:]
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(lines)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines skipped)."""
        found = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def stop(self) -> int:
        """SIGTERM, then wait; kill (and fail) if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.name} did not stop within {STOP_TIMEOUT_S} s\n{self.tail()}")


def bridge_env(namespace: str, tmp_path: Path, ports: Ports) -> dict[str, str]:
    """This environment without its BRIDGE_* variables, then the test's (for both processes)."""
    jackpot = f"http://{LOOPBACK}:{ports.jackpot}"
    values = {
        "amqp_url": AMQP_URL,
        "namespace": namespace,
        "key_secrets": ",".join(TEST_SECRETS),
        "http_host": LOOPBACK,
        "http_port": str(ports.http),
        "worker_http_port": str(ports.worker_http),
        "jackpot_api_url": jackpot,
        "jackpot_api_key": DEFAULT_JACKPOT_API_KEY,
        "jackpot_confirm": "api",
        "doshii_api_url": f"http://{LOOPBACK}:{ports.doshii}{DOSHII_BASE_PATH}",
        "doshii_client_id": DEFAULT_DOSHII_CLIENT_ID,
        "doshii_client_secret": DEFAULT_DOSHII_CLIENT_SECRET,
        "pdf_hosts": jackpot,
        "pdf_dir": str(tmp_path / "pdfs"),
        "spool_dir": str(tmp_path / "spool"),
        # The tiers the `broker` fixture declared the namespace with.
        "retry_tiers_s": ",".join(map(str, TEST_TIERS_S)),
        "partner_timeout_s": "5",
        "drain_timeout_s": "5",
        "log_json": "true",
        "log_level": "info",
        "database_url": DATABASE_URL,
        "database_schema": schema_for(namespace),
    }
    inherited = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return {**inherited, **as_env(values)}


def start(name: str, args: list[str], env: Mapping[str, str], log_path: Path) -> Child:
    """`python -m bridge ARGS`, its stdout and stderr both into `log_path`."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "bridge", *args],
            env=dict(env),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Child(name, process, log_path)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """The test's subprocesses; any still running at the end is killed."""
    started: list[Child] = []
    yield started
    for child in started:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


async def wait_for_event(
    sandbox: Child, event: str, count: int = 1, others: Sequence[Child] = ()
) -> list[dict[str, Any]]:
    """The sandbox's log once it holds `count` lines named `event`; fails on a timeout or when
    a process exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STORY_TIMEOUT_S
    while True:
        events = sandbox.events()
        if sum(e.get("event") == event for e in events) >= count:
            return events
        for child in (sandbox, *others):
            code = child.process.poll()
            if code is not None:
                tails = "\n".join(c.tail() for c in (sandbox, *others))
                pytest.fail(f"{child.name} exited with status {code}\n{tails}")
        if loop.time() > deadline:
            tails = "\n".join(c.tail() for c in (sandbox, *others))
            pytest.fail(f"no {count} {event!r} lines within {STORY_TIMEOUT_S} s\n{tails}")
        await asyncio.sleep(POLL_S)


async def wait_for_stories(sandbox: Child, others: Sequence[Child]) -> list[dict[str, Any]]:
    """The sandbox's log once STORIES stories have finished."""
    return await wait_for_event(sandbox, "story finished", STORIES, others)


def story_lines(events: list[dict[str, Any]], number: int, event: str) -> list[dict[str, Any]]:
    """Story `number`'s lines named `event`, in order."""
    return [e for e in events if e.get("event") == event and e.get("story") == number]


def expected_line(kind: Kind, amount: str) -> dict[str, Any]:
    """What a voucher line of `kind` must say, whatever its ids and retries."""
    if kind is Kind.CANCELLED:
        return {"status": "cancelled", "amount": "-", "expected": "cancelled"}
    return {"status": "activated", "amount": amount, "expected": f"activated {amount}"}


def check_vouchers(lines: list[dict[str, Any]]) -> None:
    """One ok line per case, in CASES order, each ended as its case wants."""
    assert [line["case"] for line in lines] == [str(case.kind) for case in CASES]
    for case, line in zip(CASES, lines, strict=True):
        amount = money(value_to_cents(case.value, 100))
        wanted = expected_line(case.kind, amount)
        assert {key: line[key] for key in wanted} == wanted, line
        assert line["ok"] is True, line
        assert line["problems"] == [], line
        assert line["level"] == "info", line
    by_case = {line["case"]: line for line in lines}
    assert "link renewed" in by_case[Kind.EXPIRED_LINK]["retries"]
    assert "Doshii PUT 503 x2" in by_case[Kind.DOSHII_503]["retries"]


async def test_story_mode_plays_every_voucher_against_a_separate_bridge(
    broker: Names, namespace: str, tmp_path: Path, children: list[Child]
) -> None:
    ports = Ports(*free_ports(4))
    env = bridge_env(namespace, tmp_path, ports)
    sandbox_args = [
        "sandbox",
        "--story",
        ports.ingress_url,
        "--story-repeat-s",
        str(REPEAT_S),
        "--jackpot-port",
        str(ports.jackpot),
        "--doshii-port",
        str(ports.doshii),
        "--host",
        LOOPBACK,
    ]
    sandbox = start("bridge sandbox", sandbox_args, env, tmp_path / "sandbox.log")
    children.append(sandbox)
    # The bridge starts once the sandboxes are up, so the story has to wait for its ingress.
    await wait_for_event(sandbox, "story waiting for the ingress")
    bridge = start("bridge run", ["run"], env, tmp_path / "bridge.log")
    children.append(bridge)

    events = await wait_for_stories(sandbox, [bridge])
    (ready,) = [e for e in events if e.get("event") == "story ingress ready"]
    assert ready["url"] == f"{ports.ingress_url}/readyz"

    request_ids: set[str] = set()
    for number in range(1, STORIES + 1):
        (summary,) = story_lines(events, number, "story finished")
        assert summary["verdict"] == OK_VERDICT, summary
        assert summary["level"] == "info"
        cancelled = sum(case.kind is Kind.CANCELLED for case in CASES)
        assert summary["vouchers"] == summary["ok"] == len(CASES)
        assert summary["activated"] == len(CASES) - cancelled
        assert summary["cancelled"] == cancelled
        assert summary["problems"] == []
        vouchers = story_lines(events, number, "story voucher")
        check_vouchers(vouchers)
        # Every story opens fresh Doshii requests.
        ids = {line["doshii_request_id"] for line in vouchers}
        assert len(ids) == len(CASES)
        assert not ids & request_ids
        request_ids |= ids
    assert not [e for e in events if e.get("level") in ("warning", "error")]
    # Neither the key secrets nor the keys minted with them reach the log.
    assert all(secret not in sandbox.text() for secret in TEST_SECRETS)
    assert "notificationKey" not in sandbox.text()

    assert sandbox.stop() == 0, sandbox.tail()
    assert bridge.stop() == 0, bridge.tail()


def test_story_without_key_secrets_exits_2_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    completed = subprocess.run(
        [sys.executable, "-m", "bridge", "sandbox", "--story", "http://127.0.0.1:9"],
        env=env,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    assert "BRIDGE_KEY_SECRETS" in completed.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--story", "ingress:8080"],
        ["--story", "ftp://ingress:8080"],
        ["--story", "http://ingress:8080", "--story-repeat-s", "-1"],
        ["--story", "http://ingress:8080", "--story-repeat-s", "soon"],
    ],
)
def test_story_options_are_checked(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parser().parse_args(["sandbox", *args])
    assert exited.value.code == 2


def test_story_options_parse() -> None:
    args = cli.parser().parse_args(
        ["sandbox", "--story", "http://ingress:8080/", "--story-repeat-s", "60"]
    )
    assert args.story == "http://ingress:8080"
    assert args.story_repeat_s == 60.0
    plain = cli.parser().parse_args(["sandbox"])
    assert plain.story is None
    assert plain.story_repeat_s == 0


def test_repeat_needs_a_story(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sandbox", "--story-repeat-s", "5"]) == 2
    assert "--story-repeat-s needs --story" in capsys.readouterr().err


async def test_waiting_for_the_ingress_is_bounded_and_logged() -> None:
    (closed,) = free_ports(1)
    with capture_logs() as logged:
        ready = await wait_for_ingress(
            f"http://{LOOPBACK}:{closed}", timeout_s=1.0, poll_s=0.1, log_every_s=0.5
        )
    assert ready is False
    events = [entry["event"] for entry in logged]
    assert events[0] == "story waiting for the ingress"
    assert events.count("story waiting for the ingress") >= 2
    assert events[-1] == "story ingress not ready"
    assert all(entry["url"] == f"http://{LOOPBACK}:{closed}/readyz" for entry in logged)


async def test_a_story_without_a_ready_ingress_is_skipped(settings: Settings) -> None:
    (closed,) = free_ports(1)
    async with await start_sandboxes(LOOPBACK) as sandboxes:
        with capture_logs() as logged:
            await tell_stories(
                sandboxes, settings, f"http://{LOOPBACK}:{closed}", ready_timeout_s=0.5
            )
        assert sandboxes.doshii.requests == {}
        assert sandboxes.jackpot.vouchers == {}
    skipped = [entry for entry in logged if entry["event"] == "story skipped"]
    assert len(skipped) == 1
    assert skipped[0]["log_level"] == "error"
    assert not [entry for entry in logged if entry["event"] == "story started"]


async def ready(request: web.Request) -> web.Response:
    """/readyz of an ingress that is ready."""
    return web.json_response({"status": "ready"})


async def refuse(request: web.Request) -> web.Response:
    """A notification the ingress cannot take."""
    return web.Response(status=503)


async def refusing_ingress() -> web.AppRunner:
    """An ingress that is ready but answers every notification 503."""
    app = web.Application()
    app.router.add_get("/readyz", ready)
    app.router.add_post(NOTIFICATION_PATH, refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    return runner


async def test_a_story_whose_notifications_are_refused_fails_loudly(settings: Settings) -> None:
    runner = await refusing_ingress()
    url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    timing = Timing(deadline_s=1.5, retry_window_s=0.5, progress_interval_s=0.5)
    try:
        async with await start_sandboxes(LOOPBACK) as sandboxes:
            with capture_logs() as logged:
                outcome = await tell_story(7, sandboxes, settings, url, timing=timing)
    finally:
        await runner.cleanup()
    assert outcome is not None
    assert outcome.verdict == FAILED_VERDICT
    assert all(row.problems for row in outcome.rows)
    assert all(row.status == "pending" for row in outcome.rows)
    by_event: dict[str, list[MutableMapping[str, Any]]] = {}
    for entry in logged:
        by_event.setdefault(entry["event"], []).append(entry)
    assert len(by_event["story stuck"]) == len(CASES)
    assert by_event["story progress"]
    vouchers = by_event["story voucher"]
    assert [line["ok"] for line in vouchers] == [False] * len(CASES)
    assert all("stuck after 2 s" in line["problems"][0] for line in vouchers)
    # Every voucher Jackpot notified says what the ingress answered.
    notified = [line for line in vouchers if line["case"] != Kind.DOSHII_503]
    assert all("ingress answers [503, 503" in line["problems"][0] for line in notified)
    (summary,) = by_event["story finished"]
    assert summary["verdict"] == FAILED_VERDICT
    assert summary["log_level"] == "error"
    assert summary["ok"] == 0
    assert len(summary["problems"]) >= len(CASES)


def test_compose_sandbox_tells_the_story_to_the_ingress(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())["services"]
    sandbox, ingress, lb = services["sandbox"], services["ingress"], services["lb"]
    args = cli.parser().parse_args(_resolve(sandbox["command"], REQUIRED_FOR_TESTS))
    # Through the load balancer in front of the ingress replicas, as Jackpot's calls go.
    port = int(_resolve(lb["ports"], {})[0].rsplit(":", 1)[1])
    assert args.story == f"http://lb:{port}"
    assert args.story_repeat_s > 0
    assert sandbox["depends_on"]["lb"]["condition"] == "service_started"
    assert lb["depends_on"]["ingress"]["condition"] == "service_healthy"
    assert "healthcheck" in ingress
    # The same expressions as the bridge's: the same secret, the same conversion.
    for name in ("BRIDGE_KEY_SECRETS", "BRIDGE_VALUE_TO_CENTS"):
        assert sandbox["environment"][name] == ingress["environment"][name]
    # What the container's environment gives `--story`: valid settings.
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    environment = _resolve(sandbox["environment"], REQUIRED_FOR_TESTS)
    for name, value in {**_image_env(), **environment}.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, str(value))
    settings = cli._story_settings(args)
    secrets = [secret.get_secret_value() for secret in settings.key_secrets]
    assert secrets == [REQUIRED_FOR_TESTS["BRIDGE_KEY_SECRETS"]]
