"""The whole pipeline in one test process: sandboxes, the ingress and every worker, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ingress.app import NOTIFICATION_PATH, create_app
from sandbox.server import Sandboxes, start_sandboxes
from shared.keys import KeyRing
from shared.ledger import Ledger
from shared.models import KeyClaims
from shared.service import start_site
from shared.settings import Settings
from shared.topology import Names, Stage
from workers.deps import open_deps
from workers.ledger import LedgerWriter
from workers.main import handlers, stages_for
from workers.runner import Runner, until_quiet


@dataclass
class Voucher:
    """One voucher's story: the Doshii request it pays for and the Jackpot voucher."""

    request_id: str
    location_id: str
    voucher_id: str
    coupon_id: str
    key: str


@dataclass
class Pipeline:
    settings: Settings
    sandboxes: Sandboxes
    ingress_url: str
    runner: Runner | None

    @property
    def notification_url(self) -> str:
        return f"{self.ingress_url}{NOTIFICATION_PATH}"

    def new_voucher(self, *, value: int = 110, amount_cents: int | None = None) -> Voucher:
        """A pending Doshii request and a Jackpot reservation whose key names it."""
        amount = value * self.settings.value_to_cents if amount_cents is None else amount_cents
        request_id = self.sandboxes.doshii.create_request(amount_cents=amount)
        location_id = self.sandboxes.doshii.locations[request_id]
        claims = KeyClaims(location_id=location_id, request_id=request_id, amount_cents=amount)
        key = KeyRing(self.settings.key_secrets).mint(claims)
        reserved = self.sandboxes.jackpot.reserve(
            notification_url=self.notification_url, notification_key=key, value=value
        )
        return Voucher(request_id, location_id, reserved["id"], reserved["couponId"], key)

    async def doshii_status(self, voucher: Voucher, *statuses: str, timeout_s: float = 20) -> str:
        return await self.sandboxes.doshii.wait_for_status(
            voucher.request_id, *statuses, timeout_s=timeout_s
        )

    async def settled(self, channel: Any, timeout_s: float = 30.0) -> None:
        """Wait until every work queue and delay tier is empty and nothing is in flight."""
        names = Names(self.settings.namespace)
        queues = [names.queue(s) for s in Stage]
        queues += [names.tier_queue(t) for t in self.settings.retry_tiers_s]
        runner = self.runner
        if runner is not None and any(s.queue == names.ledger for s in runner.stages):
            queues.append(names.ledger)  # the ledger writer runs: its steps are written too
        busy = (lambda: runner.in_flight > 0) if runner is not None else (lambda: False)
        await asyncio.wait_for(until_quiet(channel, queues, busy), timeout_s)


@asynccontextmanager
async def running_pipeline(
    make_settings: Callable[..., Settings],
    *,
    workers: bool = True,
    extra_pdf_hosts: Sequence[str] = (),
    ledger: Ledger | None = None,
    intake: bool = True,
    **overrides: Any,
) -> AsyncIterator[Pipeline]:
    """Start the sandboxes, the ingress and (unless told not to) every worker in this process.

    With `ledger`, the ledger worker runs too and writes every step there.
    """
    async with await start_sandboxes() as sandboxes:
        partners = sandboxes.settings_overrides()
        partners["pdf_hosts"] = ",".join([partners["pdf_hosts"], *extra_pdf_hosts])
        settings = make_settings(**{**partners, **overrides})
        site, port = await start_site(
            create_app(settings), "127.0.0.1", 0, shutdown_timeout_s=settings.drain_timeout_s
        )
        stop = asyncio.Event()
        try:
            if not workers:
                yield Pipeline(settings, sandboxes, f"http://127.0.0.1:{port}", None)
                return
            async with open_deps(settings) as deps:
                writers = [LedgerWriter(settings, ledger)] if ledger is not None else []
                # The till's intake needs the ledger: without one, the chain starts at Jackpot.
                with_intake = intake and ledger is not None
                stages = [
                    s for s in stages_for("all", settings) if with_intake or s != Stage.INTAKE
                ]
                deps = dataclasses.replace(deps, ledger=ledger)
                runner = Runner(settings, handlers(deps, stages), consumers=writers)
                task = asyncio.create_task(runner.run(stop))
                await asyncio.wait_for(runner.connected.wait(), 15)
                try:
                    yield Pipeline(settings, sandboxes, f"http://127.0.0.1:{port}", runner)
                finally:
                    stop.set()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(task, 15)
        finally:
            await site.cleanup()


async def counting_server(
    status: int = 200, body: bytes = b"%PDF-1.4 x"
) -> tuple[web.AppRunner, str, list[str]]:
    """A loopback server that records every path it is asked for (to prove nothing was fetched)."""
    hits: list[str] = []

    async def any_path(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        return web.Response(status=status, body=body, content_type="application/pdf")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    runner, port = await start_site(app, "127.0.0.1", 0, shutdown_timeout_s=1)
    return runner, f"http://127.0.0.1:{port}", hits


def settings_env(settings: Settings) -> dict[str, str]:
    """The BRIDGE_* variables that reproduce `settings` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if name in ("key_secrets", "doshii_webhook_auth"):
            text = ",".join(s.get_secret_value() for s in value)
        elif name == "jackpot_offers":
            text = ",".join(f"{loc}={store}:{offer}" for loc, (store, offer) in value.items())
        elif name == "pdf_hosts":
            text = ",".join(f"{o[0]}://{o[1]}:{o[2]}" for o in value)
        elif name == "retry_tiers_s":
            text = ",".join(map(str, value))
        elif hasattr(value, "get_secret_value"):
            text = value.get_secret_value()
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"BRIDGE_{name.upper()}"] = text
    return env
