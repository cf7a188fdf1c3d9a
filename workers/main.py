"""Worker processes: `bridge worker ROLE` and `bridge run` (the ingress and every worker)."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from shared import service
from shared.errors import SettingsError
from shared.service import start_site
from shared.settings import Settings
from shared.topology import Stage
from workers import doshii, lifecycle, pdfs, reservations
from workers.deps import Deps, open_deps
from workers.runner import Handler, Runner

log = structlog.get_logger("workers")

HANDLER_FACTORIES = {
    Stage.RESERVATIONS: reservations.make_handler,
    Stage.PDFS: pdfs.make_handler,
    Stage.LIFECYCLE: lifecycle.make_handler,
    Stage.DOSHII: doshii.make_handler,
}

RUNNER = web.AppKey("runner", Runner)


def stages_for(role: str) -> list[Stage]:
    return list(Stage) if role == "all" else [Stage(role)]


def check_settings(settings: Settings, role: str) -> None:
    """Refuse to start a role that its settings leave unable to work."""
    if Stage.PDFS in stages_for(role) and not settings.pdf_hosts:
        raise SettingsError(
            "voucher-bridge cannot start: bad settings\n"
            "  BRIDGE_PDF_HOSTS: is empty; the pdfs worker may fetch voucher PDFs from nowhere"
        )


def handlers(deps: Deps, stages: list[Stage]) -> dict[Stage, Handler]:
    # A stage whose worker is not in this build (intake, issue 10) keeps its queue for it.
    return {stage: HANDLER_FACTORIES[stage](deps) for stage in stages if stage in HANDLER_FACTORIES}


async def _readyz(request: web.Request) -> web.Response:
    runner = request.app[RUNNER]
    if runner.ready:
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
    """Run the workers of `role` until SIGTERM (or, with drain, until the queues are empty)."""
    async with open_deps(settings) as deps:
        runner = Runner(settings, handlers(deps, stages_for(role)), role=f"worker {role}")
        site, port = await start_site(
            status_app(runner), settings.http_host, settings.worker_http_port, shutdown_timeout_s=1
        )
        log.info("worker_status_listening", role=role, port=port)
        try:
            await runner.run(stop, drain=drain)
        finally:
            await site.cleanup()


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
