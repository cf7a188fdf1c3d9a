"""Start both sandboxes as real HTTP servers: in-process for tests, or for good (`bridge sandbox`).

In-process: `async with await start_sandboxes() as sandboxes:`, then point the bridge at them
with `Settings(..., **sandboxes.settings_overrides())`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import structlog
from aiohttp import web

from sandbox import doshii as doshii_app
from sandbox import jackpot as jackpot_app
from sandbox.catalogue import DEFAULT_OFFER_ID, DEFAULT_STORE_ID
from sandbox.control import add_doshii_controls, add_jackpot_controls
from sandbox.doshii import DOSHII_BASE_PATH, WEBHOOK_FIRST_BACKOFF_S, DoshiiSandbox
from sandbox.faults import Faults
from sandbox.jackpot import LINK_TTL_S, JackpotSandbox, SignedUrlShape

DEFAULT_JACKPOT_API_KEY = "jackpot-sandbox-key"
DEFAULT_DOSHII_CLIENT_ID = "bridge-sandbox"
# 32 bytes or more: PyJWT warns about shorter HS256 keys.
DEFAULT_DOSHII_CLIENT_SECRET = "doshii-sandbox-secret-0123456789abcdef"
# The back office's "Api Signature" and client id the bridge's sessions use (32+ bytes, as above).
DEFAULT_JACKPOT_API_SIGNATURE = "jackpot-sandbox-api-signature-0123456789"
DEFAULT_JACKPOT_CLIENT_ID = "bridge-sandbox"
# A stopping sandbox waits this long for handlers still running (a `delay_s` fault, say).
SHUTDOWN_TIMEOUT_S = 1.0

log = structlog.get_logger("sandbox")
# What a signal's handler is when nobody installed one.
_DEFAULT_HANDLERS: dict[signal.Signals, object] = {
    signal.SIGTERM: signal.SIG_DFL,
    signal.SIGINT: signal.default_int_handler,
}


@dataclass
class Sandboxes:
    """Both sandboxes, started; `close()` (or leaving `async with`) stops them."""

    jackpot: JackpotSandbox
    doshii: DoshiiSandbox
    jackpot_url: str  # BRIDGE_JACKPOT_API_URL
    doshii_url: str  # BRIDGE_DOSHII_API_URL (includes the base path, /partner/v3)
    pdf_origin: str  # the origin of PDF links: what BRIDGE_PDF_HOSTS must allow
    faults: Faults  # shared: the same object as jackpot.faults and doshii.faults
    _runners: list[web.AppRunner] = field(default_factory=list, repr=False)

    def settings_overrides(self) -> dict[str, str]:
        """The bridge's settings that point it at these sandboxes (`Settings(**overrides)`)."""
        return {
            "jackpot_api_url": self.jackpot_url,
            "jackpot_api_key": self.jackpot.api_key,
            "jackpot_api_signature": self.jackpot.api_signature,
            "jackpot_client_id": self.jackpot.client_id,
            "jackpot_store_id": DEFAULT_STORE_ID,
            "jackpot_offer_id": DEFAULT_OFFER_ID,
            "doshii_api_url": self.doshii_url,
            "doshii_client_id": self.doshii.client_id,
            "doshii_client_secret": self.doshii.client_secret,
            "pdf_hosts": self.pdf_origin,
        }

    async def close(self) -> None:
        """Stop both servers and close the notification client."""
        while self._runners:
            await self._runners.pop().cleanup()
        await self.jackpot.aclose()
        await self.doshii.aclose()

    async def __aenter__(self) -> Sandboxes:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _origin(host: str, port: int) -> str:
    """`http://host:port`, reachable from this machine even when bound to every interface."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    with contextlib.suppress(ValueError):
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
    return f"http://{host}:{port}"


async def _serve(
    app: web.Application, host: str, port: int, *, access_log: bool
) -> tuple[web.AppRunner, int]:
    runner = (
        web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        if access_log
        else web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        address = runner.addresses[0]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(address[1])


async def start_sandboxes(
    host: str = "127.0.0.1",
    jackpot_port: int = 0,
    doshii_port: int = 0,
    *,
    jackpot_api_key: str = DEFAULT_JACKPOT_API_KEY,
    doshii_client_id: str = DEFAULT_DOSHII_CLIENT_ID,
    doshii_client_secret: str = DEFAULT_DOSHII_CLIENT_SECRET,
    link_secret: bytes | None = None,
    link_ttl_s: float = LINK_TTL_S,
    signed_url_shape: SignedUrlShape = "signedUrl",
    doshii_base_path: str = DOSHII_BASE_PATH,
    access_log: bool = False,
    jackpot_api_signature: str = DEFAULT_JACKPOT_API_SIGNATURE,
    jackpot_client_id: str = DEFAULT_JACKPOT_CLIENT_ID,
    jackpot_notification_url: str | None = None,
    webhook_first_backoff_s: float = WEBHOOK_FIRST_BACKOFF_S,
) -> Sandboxes:
    """Start the Jackpot and Doshii sandboxes on `host` (port 0: any free port), with control
    routes, sharing one `Faults`. Use as `async with await start_sandboxes() as sandboxes:`.
    """
    faults = Faults()
    jackpot = JackpotSandbox(
        jackpot_api_key,
        link_secret,
        link_ttl_s,
        signed_url_shape,
        faults=faults,
        api_signature=jackpot_api_signature,
        client_id=jackpot_client_id,
        reserve_notification_url=jackpot_notification_url,
    )
    doshii = DoshiiSandbox(
        doshii_client_id,
        doshii_client_secret,
        base_path=doshii_base_path,
        faults=faults,
        webhook_first_backoff_s=webhook_first_backoff_s,
    )
    jackpot_web = jackpot_app.create_app(jackpot)
    add_jackpot_controls(jackpot_web)
    doshii_web = doshii_app.create_app(doshii)
    add_doshii_controls(doshii_web)

    runners: list[web.AppRunner] = []
    try:
        runner, port = await _serve(jackpot_web, host, jackpot_port, access_log=access_log)
        runners.append(runner)
        jackpot.public_base_url = _origin(host, port)
        runner, port = await _serve(doshii_web, host, doshii_port, access_log=access_log)
        runners.append(runner)
        doshii.public_base_url = _origin(host, port)
    except BaseException:
        for started in reversed(runners):
            await started.cleanup()
        raise
    return Sandboxes(
        jackpot=jackpot,
        doshii=doshii,
        jackpot_url=jackpot.public_base_url,
        doshii_url=doshii.api_url,
        pdf_origin=jackpot.public_base_url,
        faults=faults,
        _runners=runners,
    )


async def run_forever(
    host: str,
    jackpot_port: int,
    doshii_port: int,
    jackpot_api_key: str,
    doshii_client_id: str,
    doshii_client_secret: str,
    *,
    jackpot_api_signature: str = DEFAULT_JACKPOT_API_SIGNATURE,
    jackpot_client_id: str = DEFAULT_JACKPOT_CLIENT_ID,
    jackpot_notification_url: str | None = None,
    on_started: Callable[[Sandboxes], None] | None = None,
) -> None:
    """Serve both sandboxes (with their `/_sandbox` control routes) until cancelled or SIGTERM.

    SIGTERM and SIGINT are handled here only while nobody else handles them: a caller that
    installed its own handlers (and cancels this coroutine) keeps them.
    """
    sandboxes = await start_sandboxes(
        host,
        jackpot_port,
        doshii_port,
        jackpot_api_key=jackpot_api_key,
        doshii_client_id=doshii_client_id,
        doshii_client_secret=doshii_client_secret,
        access_log=True,
        jackpot_api_signature=jackpot_api_signature,
        jackpot_client_id=jackpot_client_id,
        jackpot_notification_url=jackpot_notification_url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not _DEFAULT_HANDLERS[signum]:
            continue
        # Only the main thread of a Unix process can own signal handlers; elsewhere, cancel.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        log.info(
            "sandbox started",
            jackpot_url=sandboxes.jackpot_url,
            doshii_url=sandboxes.doshii_url,
            pdf_origin=sandboxes.pdf_origin,
            jackpot_notification_url=jackpot_notification_url,
        )
        if on_started is not None:
            on_started(sandboxes)
        await stop.wait()
        log.info("sandbox stopping")
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await sandboxes.close()
