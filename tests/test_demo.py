"""`python -m sandbox.demo` as a person runs it: exit 0, a readable table, nothing left behind."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity

from sandbox.story import CASES, Kind
from sandbox.till_demo import CASES as TILL_CASES
from shared.topology import Names
from tests.conftest import AMQP_URL

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
NAMESPACE_LINE = re.compile(r"^namespace: (demo-[0-9a-f]+)$", re.MULTILINE)
CELL_GAP = re.compile(r"\s{2,}")

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S + STOP_TIMEOUT_S + 30)


@dataclass(frozen=True)
class DemoRun:
    """What one run of the demo printed, and how it exited."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def namespace(self) -> str:
        match = NAMESPACE_LINE.search(self.stdout)
        assert match is not None, self.stdout
        return match.group(1)

    def rows(self) -> list[dict[str, str]]:
        """The voucher table: from the `case ...` header to the first line that is not a row."""
        lines = self.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("case  "))
        headers = CELL_GAP.split(lines[start].strip())
        rows = []
        for line in lines[start + 2 :]:
            cells = CELL_GAP.split(line.strip())
            if line.startswith(" ") or len(cells) != len(headers):
                break
            rows.append(dict(zip(headers, cells, strict=True)))
        return rows


def run_demo() -> DemoRun:
    """Run the demo like `make demo` does; on timeout, SIGTERM it so it still cleans up."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox.demo"],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
        pytest.fail(f"the demo took over {DEMO_TIMEOUT_S} s:\n{stdout}\n{stderr}")
    return DemoRun(process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoRun]:
    """One run for the module's tests; its `var/demo-<ns>/` folder is removed afterwards."""
    run = run_demo()
    yield run
    match = NAMESPACE_LINE.search(run.stdout)
    if match is not None:
        shutil.rmtree(REPO_ROOT / "var" / match.group(1), ignore_errors=True)


def test_demo_exits_zero_with_an_ok_verdict(demo: DemoRun) -> None:
    assert demo.returncode == 0, f"{demo.stdout}\n{demo.stderr}"
    assert "RESULT: OK" in demo.stdout
    assert "dead letters in" in demo.stdout
    assert f"{len(CASES)}/{len(CASES)} finished" in demo.stderr


def test_table_lists_every_voucher_activated_but_the_cancelled_one(demo: DemoRun) -> None:
    rows = demo.rows()
    cancelled = sum(case.kind is Kind.CANCELLED for case in CASES)
    assert len(rows) == len(CASES)
    assert [row["status"] for row in rows].count("activated") == len(CASES) - cancelled
    assert [row["status"] for row in rows].count("cancelled") == cancelled == 1
    assert all(row["ok"] == "ok" for row in rows)
    for row in rows:
        if row["status"] == "activated":
            assert row["PDF"].endswith(".pdf")
            assert int(row["PDF bytes"]) > 0
            assert row["expected"] == f"activated {row['amount']}"
        else:
            assert row["PDF"] == "-"


def test_retries_show_for_the_expired_link_and_the_doshii_fault(demo: DemoRun) -> None:
    by_case = {row["case"]: row for row in demo.rows()}
    assert "link renewed" in by_case[Kind.EXPIRED_LINK]["retries"]
    assert "Doshii PUT 503 x2" in by_case[Kind.DOSHII_503]["retries"]


async def test_the_run_left_no_exchange_or_queue(demo: DemoRun) -> None:
    names = Names(demo.namespace)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        # A 404 closes the channel it happens on: one channel per look.
        events_channel = await connection.channel()
        with pytest.raises(ChannelNotFoundEntity):
            await events_channel.declare_exchange(names.events, passive=True)
        dead_channel = await connection.channel()
        with pytest.raises(ChannelNotFoundEntity):
            await dead_channel.declare_queue(names.dead, passive=True)


def test_a_voucher_s_journey_is_shown_from_the_ledger(demo: DemoRun) -> None:
    assert "`bridge status` reads the ledger:" in demo.stdout
    story = demo.stdout.split("`bridge status` reads the ledger:", 1)[1]
    assert "state: activated" in story
    for step in ("received: RESERVED notification", "confirmed", "PDF stored", "activated"):
        assert step in story
    assert "ledger schema" in demo.stdout
    assert "dropped" in demo.stdout


def test_cards_sold_at_the_till_end_as_each_case_should(demo: DemoRun) -> None:
    till = demo.stdout.split("Cards sold at the till", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in till.splitlines()[3:] if line.strip()]
    assert len(rows) == len(TILL_CASES)
    for case, line in zip(TILL_CASES, rows, strict=True):
        assert line.startswith(case.name)
        assert "  ok  " in line, line
        if case.expected == "activated":
            assert " activated " in line
            assert "pdfs: activated" in line
        else:
            assert case.expected in line
            assert "intake: refused" in line
    duplicate = next(r for r in rows if r.startswith("webhook sent 3 times"))
    assert " 1 " in duplicate  # one voucher reserved for three deliveries
