"""The servers under test as subprocesses: start with a log file, wait until they answer, stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO

import aiohttp

NOTIFICATION_PATH = "/notifications/jackpot/reserve"
READY_TIMEOUT_S = 60.0
READY_POLL_S = 0.2
PROBE_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_BYTES = 4000


class Probe(Enum):
    """How to tell that a server is up."""

    READYZ = "GET /readyz answers 200"
    ANY_ANSWER = "POST to the notification path gets any answer"


@dataclass
class Server:
    """One server under test, started as `argv` with `env`, its output going to `log_path`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    probe: Probe
    cwd: Path | None = None
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The server's base URL, ending in a slash."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        """The process id of the running server."""
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.process.pid

    def log_tail(self) -> str:
        """The end of the server's output, to show when it failed to start."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-LOG_TAIL_BYTES:].decode(errors="replace")


def free_port() -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start(server: Server) -> None:
    """Start the server's process, stdout and stderr both to its log file."""
    server.log_file = server.log_path.open("wb")
    server.process = await asyncio.create_subprocess_exec(
        *server.argv,
        env=server.env,
        cwd=server.cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=server.log_file,
        stderr=asyncio.subprocess.STDOUT,
    )


async def _answers(session: aiohttp.ClientSession, server: Server) -> bool:
    try:
        if server.probe is Probe.READYZ:
            async with session.get(f"{server.url}readyz") as response:
                return response.status == 200
        async with session.post(
            f"{server.url.rstrip('/')}{NOTIFICATION_PATH}?notificationKey=probe", json={}
        ):
            return True
    except (aiohttp.ClientError, TimeoutError):
        return False


async def wait_ready(server: Server, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll the server until its probe passes; raise with its log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not await _answers(session, server):
            if server.process is None or server.process.returncode is not None:
                raise RuntimeError(f"{server.name} exited while starting:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name} not ready after {timeout_s:.0f} s "
                    f"({server.probe.value}):\n{server.log_tail()}"
                )
            await asyncio.sleep(READY_POLL_S)


async def end_process(process: asyncio.subprocess.Process, signum: int, timeout_s: float) -> None:
    """Send `signum`, wait up to `timeout_s` for the exit, then SIGKILL; nothing if it is gone."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)
    try:
        async with asyncio.timeout(timeout_s):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def stop(server: Server) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S; close its log."""
    try:
        if server.process is not None:
            await end_process(server.process, signal.SIGTERM, STOP_TIMEOUT_S)
    finally:
        if server.log_file is not None:
            server.log_file.close()
            server.log_file = None
