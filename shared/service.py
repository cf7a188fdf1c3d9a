"""Running a long-lived service: uvloop, SIGTERM/SIGINT to a stop event, HTTP sites."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency; kept optional for other platforms
    uvloop = None  # type: ignore[assignment]


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]) -> int:
    """Run `main(stop)` on uvloop; SIGTERM and SIGINT set `stop`, and main returns when done."""

    async def wrapper() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.set_exception_handler(quiet_connection_errors)
        return await main(stop)

    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(wrapper()) or 0


def quiet_connection_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A connection attempt's own future left unread (a TLS handshake that failed, say): the
    caller reported the failure already, so one line says it, not a second traceback."""
    error = context.get("exception")
    if isinstance(error, OSError) and "never retrieved" in str(context.get("message", "")):
        logging.getLogger("asyncio").warning(
            "connection attempt failed: %s: %s", type(error).__name__, error
        )
        return
    loop.default_exception_handler(context)


# The AppRunner class an application wants to be served by (the ingress has its own).
RUNNER: web.AppKey[type[web.AppRunner]] = web.AppKey("runner")


async def start_site(
    app: web.Application, host: str, port: int, *, shutdown_timeout_s: float
) -> tuple[web.AppRunner, int]:
    """Serve `app`; returns its runner (cleanup() stops accepting, drains, closes) and its port."""
    runner = app.get(RUNNER, web.AppRunner)(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive (readiness is each service's own /readyz)."""
    return web.json_response({"status": "alive"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: this process's Prometheus metrics."""
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
