"""The bridge as real processes for the fault scenarios: start, kill, watch, settle.

A scenario runs the sandboxes in the test process and the bridge the way it is deployed:
`python -m bridge ingress` and `python -m bridge worker all`, each a child process with
its log in a file of its own. `open_bridge` kills whatever is still running when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
from aio_pika.abc import AbstractChannel

from ingress.spool import SUFFIX, is_owned_folder
from sandbox.server import Sandboxes
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.support.pipeline import Pipeline, Voucher, settings_env
from workers import dlq

REPO = Path(__file__).resolve().parents[2]
# Retry tiers for every scenario. A message's last attempt starts at least sum(tiers) after its
# first one (each tier is a TTL it waits out), so these survive any outage shorter than 31 s.
TIERS_S = (1, 2, 4, 8, 16)
FINAL_STATUSES = frozenset({"activated", "cancelled"})
# The pipeline counts as settled after this many consecutive calm looks, this far apart.
CALM_LOOKS = 3
LOOK_S = 0.2
POLL_S = 0.05
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` until it holds; AssertionError naming `what` after `timeout_s`."""

    async def poll() -> None:
        while not check():  # noqa: ASYNC110 - the state lives in sandboxes and other processes
            await asyncio.sleep(POLL_S)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError as error:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from error


async def wait_until_async(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str
) -> None:
    """`wait_until` for a check that has to ask over the network."""

    async def poll() -> None:
        while not await check():  # noqa: ASYNC110 - asked over the network, no event to wait on
            await asyncio.sleep(POLL_S)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError as error:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from error


@dataclass
class Proc:
    """A bridge process: `python -m bridge ...`, its output in `log_path`."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    log: IO[bytes]
    told_to_exit: bool = False  # set when the test kills or stops it

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def rss_mb(self) -> float:
        """Resident memory now, from /proc/<pid>/status (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"{self.name} (pid {self.pid}) shows no VmRSS")

    @property
    def crashed(self) -> bool:
        """It exited without being told to."""
        return not self.alive and not self.told_to_exit

    def crash_report(self) -> str:
        """Its exit code and the last lines of its output (the traceback, normally)."""
        return f"{self.name} pid {self.pid} exited {self.process.returncode}:\n{self.tail(8)}"

    def signal(self, signum: signal.Signals) -> None:
        self.told_to_exit = True
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def wait(self, timeout_s: float) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        self.log.close()
        return code

    async def kill(self) -> int:
        """SIGKILL: no goodbye, no flush, no ack. Returns the exit code (-9)."""
        self.signal(signal.SIGKILL)
        return await self.wait(STOP_TIMEOUT_S)

    async def stop(self) -> int:
        """SIGTERM, the graceful way; SIGKILL if it is not gone in time. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(STOP_TIMEOUT_S)
        except TimeoutError:
            return await self.kill()

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Senders:
    """Notification tasks (Jackpot's side of a scenario), waited for with a bound."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.tasks.append(asyncio.create_task(coroutine))

    async def paced(
        self, starts: Sequence[Callable[[], Coroutine[Any, Any, Any]]], every_s: float
    ) -> None:
        """Start one sender every `every_s` seconds: load at a steady rate."""
        for start in starts:
            self.start(start())
            await asyncio.sleep(every_s)

    async def wait(self, timeout_s: float) -> list[Any]:
        """Every sender's result, in order; AssertionError if some are still going."""
        if self.tasks:
            _, late = await asyncio.wait(self.tasks, timeout=timeout_s)
            assert not late, (
                f"{len(late)} of {len(self.tasks)} senders still going after {timeout_s} s"
            )
        return [task.result() for task in self.tasks]

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class Bridge:
    """The bridge's processes of one scenario, and what the test can see of them."""

    def __init__(
        self,
        settings: Settings,
        admin: Settings,
        sandboxes: Sandboxes,
        channel: AbstractChannel,
        logs: Path,
        http: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.admin = admin  # same namespace, straight to the broker: for dead-letter listings
        self.sandboxes = sandboxes
        self.channel = channel
        self.logs = logs
        self.http = http
        self.names = Names(settings.namespace)
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.procs: list[Proc] = []
        self.ingress_url = f"http://127.0.0.1:{settings.http_port}"
        self.worker_url = f"http://127.0.0.1:{settings.worker_http_port}"
        self.pipeline = Pipeline(settings, sandboxes, self.ingress_url, None)

    # Processes

    async def _spawn(self, name: str, args: Sequence[str], env: dict[str, str]) -> Proc:
        log_path = self.logs / f"{len(self.procs):02d}-{name}.log"
        log = log_path.open("wb")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge",
                *args,
                env=env,
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        except BaseException:
            log.close()
            raise
        proc = Proc(name, process, log_path, log)
        self.procs.append(proc)
        return proc

    async def _started(self, proc: Proc, url: str, ok: Callable[[int, Any], bool]) -> None:
        """Wait until `url` answers what `ok` wants; fail at once if the process died."""

        async def poll() -> None:
            while True:
                if not proc.alive:
                    raise AssertionError(
                        f"{proc.name} exited ({proc.process.returncode}):\n{proc.tail()}"
                    )
                answer = await self.get_json(url)
                if answer is not None and ok(*answer):
                    return
                await asyncio.sleep(POLL_S)

        try:
            await asyncio.wait_for(poll(), START_TIMEOUT_S)
        except TimeoutError as error:
            raise AssertionError(f"{proc.name} did not start:\n{proc.tail()}") from error

    async def start_ingress(
        self, *, statuses: Sequence[str] = ("ready",), http_port: int | None = None
    ) -> Proc:
        """`bridge ingress` on the settings' port (or `http_port`: a second replica); returns
        once /readyz says one of `statuses`."""
        env, url = self.env, self.ingress_url
        if http_port is not None:
            env = {**self.env, "BRIDGE_HTTP_PORT": str(http_port)}
            url = f"http://127.0.0.1:{http_port}"
        proc = await self._spawn("ingress", ["ingress"], env)
        await self._started(proc, f"{url}/readyz", lambda _, body: body.get("status") in statuses)
        return proc

    async def start_worker(self, *, amqp_url: str | None = None) -> Proc:
        """`bridge worker all`; returns once it consumes (its /readyz answers 200)."""
        env = self.env if amqp_url is None else {**self.env, "BRIDGE_AMQP_URL": amqp_url}
        proc = await self._spawn("worker", ["worker", "all"], env)
        await self._started(proc, f"{self.worker_url}/readyz", lambda status, _: status == 200)
        return proc

    @property
    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.name == "worker" and p.alive]

    @property
    def ingresses(self) -> list[Proc]:
        return [p for p in self.procs if p.name == "ingress" and p.alive]

    async def kill_all(self) -> None:
        for proc in self.procs:
            if proc.alive:
                await proc.kill()
            else:
                await proc.wait(STOP_TIMEOUT_S)  # reaped already; closes its log

    # What can be seen from outside

    async def get_json(self, url: str) -> tuple[int, Any] | None:
        try:
            async with self.http.get(url) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def ingress_status(self) -> str | None:
        answer = await self.get_json(f"{self.ingress_url}/readyz")
        return None if answer is None else str(answer[1].get("status"))

    async def worker_in_flight(self) -> int | None:
        """Messages the (one) worker process holds right now; None when it does not answer."""
        answer = await self.get_json(f"{self.worker_url}/readyz")
        if answer is None or answer[0] != 200:
            return None
        return int(answer[1].get("in_flight", 0))

    def spool_folders(self) -> dict[str, int]:
        """Each ingress's spool folder under the root, with the notifications in it."""
        root = Path(self.settings.spool_dir)
        if not root.is_dir():
            return {}
        return {
            folder.name: len(list(folder.glob(f"*{SUFFIX}")))
            for folder in sorted(root.iterdir())
            if folder.is_dir() and is_owned_folder(folder.name)
        }

    def spool_depth(self) -> int:
        """Notifications spooled under the root, in any ingress's folder."""
        return len(list(Path(self.settings.spool_dir).rglob(f"*{SUFFIX}")))

    async def depth(self, queue: str) -> int:
        declared = await self.channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0

    @property
    def pipeline_queues(self) -> list[str]:
        """Every work queue and delay tier: where a message waits on its way."""
        queues = [self.names.queue(stage) for stage in Stage]
        return queues + [self.names.tier_queue(t) for t in self.settings.retry_tiers_s]

    async def waiting(self) -> dict[str, int]:
        """The non-empty work queues and tiers, with their depth."""
        depths = {q: await self.depth(q) for q in self.pipeline_queues}
        return {q: n for q, n in depths.items() if n}

    # Settling

    def open_vouchers(self, vouchers: Sequence[Voucher]) -> list[Voucher]:
        requests = self.sandboxes.doshii.requests
        return [v for v in vouchers if requests[v.request_id]["status"] not in FINAL_STATUSES]

    async def accounted(self, vouchers: Sequence[Voucher]) -> bool:
        """Every voucher is final in Doshii or has a dead letter."""
        still_open = self.open_vouchers(vouchers)
        if not still_open:
            return True
        if await self.depth(self.names.dead) == 0:
            return False
        dead = {letter.voucher_id for letter in await dlq.list_dead(self.admin)}
        return all(v.voucher_id in dead for v in still_open)

    async def calm(self) -> bool:
        """Nothing waits in a queue, a tier or the spool, and no worker holds a message."""
        if self.spool_depth() or await self.waiting():
            return False
        for _ in self.workers:
            if await self.worker_in_flight() != 0:
                return False
        return True

    async def settle(self, vouchers: Sequence[Voucher], timeout_s: float) -> bool:
        """Wait until every voucher is accounted for and the pipeline is calm; False on timeout."""

        async def poll() -> bool:
            looks = 0
            while looks < CALM_LOOKS:
                if self.crashed:
                    return False  # what it held stays put: no point waiting
                await asyncio.sleep(LOOK_S)
                settled = await self.calm() and await self.accounted(vouchers)
                looks = looks + 1 if settled else 0
            return True

        try:
            return await asyncio.wait_for(poll(), timeout_s)
        except TimeoutError:
            return False

    @property
    def crashed(self) -> list[Proc]:
        """Processes that exited without being told to."""
        return [proc for proc in self.procs if proc.crashed]

    async def finish(self) -> Finish:
        """Stop the workers (SIGTERM), then look at what is left anywhere; stop the ingress."""
        worker_codes = [await proc.stop() for proc in self.workers]
        # A message a worker held unacked is back in its queue now: it must not be there.
        held = await self.waiting()
        letters = await dlq.list_dead(self.admin)
        readiness = [await self.ingress_status() for _ in self.ingresses]
        ingress_codes = [await proc.stop() for proc in self.ingresses]
        crashes = [proc.crash_report() for proc in self.crashed]
        return Finish(
            worker_codes, ingress_codes, readiness, held, letters, self.spool_depth(), crashes
        )


@dataclass(frozen=True)
class Finish:
    worker_codes: list[int]
    ingress_codes: list[int]
    ingress_readiness: list[str | None]  # what /readyz said once everything had drained
    held: dict[str, int]  # messages left in work queues or tiers once the workers stopped
    letters: list[dlq.DeadLetter]
    spooled: int  # notifications left in the spool once the ingress stopped
    crashes: list[str]  # processes that exited without being told to


@asynccontextmanager
async def open_bridge(
    make_settings: Callable[..., Settings],
    admin: Settings,
    sandboxes: Sandboxes,
    channel: AbstractChannel,
    logs: Path,
    **overrides: Any,
) -> AsyncIterator[Bridge]:
    """A Bridge whose settings point at `sandboxes`; every process it started dies on exit."""
    settings = make_settings(
        **{
            **sandboxes.settings_overrides(),
            "retry_tiers_s": ",".join(map(str, TIERS_S)),
            "http_port": free_port(),
            "worker_http_port": free_port(),
            **overrides,
        }
    )
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=2)
    ) as http:
        bridge = Bridge(settings, admin, sandboxes, channel, logs, http)
        try:
            yield bridge
        finally:
            await bridge.kill_all()
