"""Worker processes: `bridge worker ROLE` and `bridge run` (the ingress and every worker)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import structlog
from aiohttp import web

from shared import service
from shared.errors import SettingsError
from shared.ledger import Ledger
from shared.service import start_site
from shared.settings import Settings, check_intake
from shared.topology import Stage
from workers import doshii, intake, lifecycle, pdfs, reservations
from workers.deps import Deps, open_deps
from workers.ledger import LedgerWriter
from workers.runner import Consumer, Handler, Runner
from workers.sweeper import Sweeper

log = structlog.get_logger("workers")

HANDLER_FACTORIES = {
    Stage.RESERVATIONS: reservations.make_handler,
    Stage.PDFS: pdfs.make_handler,
    Stage.LIFECYCLE: lifecycle.make_handler,
    Stage.DOSHII: doshii.make_handler,
    Stage.INTAKE: intake.make_handler,
}

RUNNER = web.AppKey("runner", Runner)


# Roles that are not a stage: they need the ledger's database.
LEDGER_ROLES = ("ledger", "sweeper")
ROLES = (*(str(s) for s in Stage), *LEDGER_ROLES, "all")


def intake_configured(settings: Settings) -> bool:
    """Whether the till's sales can be reserved: Jackpot session credentials and the ledger."""
    try:
        check_intake(settings)
    except SettingsError:
        return False
    return settings.ledger


def stages_for(role: str, settings: Settings) -> list[Stage]:
    """The stages `role` runs; `all` takes the till's sales only where they are configured."""
    if role == "all":
        return [s for s in Stage if s != Stage.INTAKE or intake_configured(settings)]
    return [] if role in LEDGER_ROLES else [Stage(role)]


def ledger_roles(settings: Settings, role: str) -> list[str]:
    """The ledger roles `role` runs: both in `all`, unless the ledger is turned off."""
    if role == "all":
        return list(LEDGER_ROLES) if settings.ledger else []
    return [role] if role in LEDGER_ROLES else []


def check_settings(settings: Settings, role: str) -> None:
    """Refuse to start a role that its settings leave unable to work."""
    if not settings.ledger and role in LEDGER_ROLES:
        raise SettingsError(
            "voucher-bridge cannot start: bad settings\n"
            f"  BRIDGE_LEDGER: is false, so there is no journal for the {role} worker to read"
        )
    if role == str(Stage.INTAKE):
        check_intake(settings)
        if not settings.ledger:
            raise SettingsError(
                "voucher-bridge cannot start: bad settings\n"
                "  BRIDGE_LEDGER: is false, but the intake claims each till request in the ledger"
            )
    if Stage.PDFS in stages_for(role, settings) and not settings.pdf_hosts:
        raise SettingsError(
            "voucher-bridge cannot start: bad settings\n"
            "  BRIDGE_PDF_HOSTS: is empty; the pdfs worker may fetch voucher PDFs from nowhere"
        )


def handlers(deps: Deps, stages: list[Stage]) -> dict[Stage, Handler]:
    return {stage: HANDLER_FACTORIES[stage](deps) for stage in stages}


async def _readyz(request: web.Request) -> web.Response:
    runner = request.app[RUNNER]
    if runner.ready or not runner.stages:  # the sweeper alone holds no broker connection
        return web.json_response({"status": "ready", "in_flight": runner.in_flight})
    return web.json_response(
        {"status": "unavailable", "detail": "no broker connection"}, status=503
    )


def status_app(runner: Runner) -> web.Application:
    """/healthz, /readyz and /metrics of a worker process."""
    app = web.Application()
    app[RUNNER] = runner
    app.router.add_get("/healthz", service.healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", service.metrics)
    return app


async def serve_workers(
    settings: Settings, role: str, stop: asyncio.Event, *, drain: bool = False
) -> None:
    """Run the workers of `role` until SIGTERM (or, with drain, until the queues are empty).

    The ledger roles need PostgreSQL at start (an unreachable one or an old schema is a
    SettingsError naming it); the stages never wait for it.
    """
    extra = ledger_roles(settings, role)
    stages = stages_for(role, settings)
    if role == "all" and Stage.INTAKE not in stages:
        log.info("intake_off", reason="no Jackpot session credentials: till sales not taken")
    async with contextlib.AsyncExitStack() as stack:
        deps = await stack.enter_async_context(open_deps(settings))
        needs_ledger = bool(extra) or Stage.INTAKE in stages
        ledger = await stack.enter_async_context(Ledger.open(settings)) if needs_ledger else None
        deps = dataclasses.replace(deps, ledger=ledger)
        consumers: list[Consumer] = []
        if ledger is not None and "ledger" in extra:
            consumers.append(LedgerWriter(settings, ledger))
        runner = Runner(
            settings,
            handlers(deps, stages),
            role=f"worker {role}",
            consumers=consumers,
        )
        site, port = await start_site(
            status_app(runner), settings.http_host, settings.worker_http_port, shutdown_timeout_s=1
        )
        stack.push_async_callback(site.cleanup)
        log.info("worker_status_listening", role=role, port=port)
        tasks = []
        if runner.stages:
            tasks.append(asyncio.create_task(runner.run(stop, drain=drain)))
        if ledger is not None and "sweeper" in extra and not (drain and role == "all"):
            # Alone and draining, the sweeper makes one pass; with the stages, it sweeps on.
            sweeper = Sweeper(settings, ledger, deps)
            tasks.append(asyncio.create_task(sweeper.run(stop, once=drain)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def serve_everything(settings: Settings, stop: asyncio.Event) -> None:
    """The one-machine default: the ingress and every worker in one process."""
    from ingress.app import create_app

    ingress, port = await start_site(
        create_app(settings),
        settings.http_host,
        settings.http_port,
        shutdown_timeout_s=settings.drain_timeout_s,
    )
    log.info("listening", host=settings.http_host, port=port)
    workers_stop = asyncio.Event()
    workers = asyncio.create_task(serve_workers(settings, "all", workers_stop))
    try:
        await asyncio.wait(
            [asyncio.ensure_future(stop.wait()), workers], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # Stop taking notifications first, then let the workers finish what is in flight.
        await ingress.cleanup()
        workers_stop.set()
        await workers
