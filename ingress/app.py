"""The ingress: Jackpot's notifications in, confirmed messages out, 200 only once stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import structlog
from aiohttp import web
from pydantic import ValidationError

from ingress.doshii import (
    DOSHII_WEBHOOK_PATH,
    WWW_AUTHENTICATE,
    BasicAuth,
    WebhookProblem,
    read_webhook,
)
from ingress.openapi import openapi_document
from ingress.spool import Spool, SpoolError
from shared import envelope, metrics, service
from shared.broker import (
    Outgoing,
    Publisher,
    connection_name,
    declare_topology,
    send,
    ssl_context,
)
from shared.errors import BrokerUnavailable, InvalidKey
from shared.intake import CardRefHasher, intake_message_id, intake_request
from shared.keys import KeyRing
from shared.models import KeyClaims, Route, Voucher
from shared.publisher import ConfirmedPublisher
from shared.settings import Settings
from shared.topology import Names

log = structlog.get_logger("ingress")

NOTIFICATION_PATH = "/notifications/jackpot/reserve"
# Jackpot's voucher JSON is well under 1 KiB; 64 KiB leaves room for extra fields, no more.
MAX_BODY_BYTES = 64 * 1024
# Jackpot retries a refused notification; a few seconds lets a reconnect or a spool drain happen.
RETRY_AFTER_S = 5
# How long to wait between attempts to declare the topology while the broker is away.
DECLARE_RETRY_S = 2.0
HEARTBEAT_S = 10


class ApiError(Exception):
    """An answer other than 200, rendered by the error middleware as {"error", "detail"}."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: object,
        *,
        outcome: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.outcome = outcome
        self.headers = headers

    def response(self) -> web.Response:
        return web.json_response(
            {"error": self.error, "detail": self.detail}, status=self.status, headers=self.headers
        )


@dataclass
class Ingress:
    """What the notification handler needs, built once per app."""

    settings: Settings
    names: Names
    keys: KeyRing
    publisher: Publisher
    spool: Spool | None
    declared: asyncio.Event
    webhook_auth: BasicAuth
    card_refs: CardRefHasher


INGRESS = web.AppKey("ingress", Ingress)


def _field_errors(error: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in problem["loc"]) or "body", "problem": problem["msg"]}
        for problem in error.errors(include_url=False, include_input=False)
    ]


def parse_voucher(body: bytes) -> Voucher:
    """Validate the raw bytes as a voucher; a 400 that names each bad field otherwise."""
    try:
        return Voucher.model_validate_json(body)
    except ValidationError as error:
        if any(p["type"] == "json_invalid" for p in error.errors()):
            raise ApiError(
                400, "invalid_json", "the body is not valid JSON", outcome="invalid"
            ) from error
        if any(p["type"] == "model_type" for p in error.errors()):
            raise ApiError(
                400, "invalid_voucher", "the body must be a JSON object", outcome="invalid"
            ) from error
        raise ApiError(400, "invalid_voucher", _field_errors(error), outcome="invalid") from error


async def _store(ingress: Ingress, message: Outgoing) -> str:
    """Publish with a confirm; while the broker cannot take it, spool it. Returns where it went."""
    spool = ingress.spool
    started = time.perf_counter()
    try:
        if spool is not None and spool.depth:
            # Older notifications are still spooled: queue behind them to keep their order.
            raise BrokerUnavailable("the spool is still draining")
        await send(ingress.publisher, message)
    except BrokerUnavailable as error:
        if spool is None:
            raise _unavailable(str(error)) from error
        try:
            await spool.append(message)
        except SpoolError as refused:
            raise _unavailable(f"{error}; {refused}") from refused
        return "spooled"
    metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
    return "accepted"


def _unavailable(reason: str) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"the notification was not stored ({reason}); retry later",
        outcome="unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _content_type_ok(request: web.BaseRequest) -> bool:
    raw = request.headers.get("Content-Type")
    # Jackpot sends exactly this; only other spellings pay for a full parse.
    return raw == "application/json" or request.content_type == "application/json"


def _accepted(status: str, message_id: str) -> web.Response:
    body = orjson.dumps({"status": status, "messageId": message_id})
    return web.Response(body=body, content_type="application/json")


async def receive_notification(request: web.Request) -> web.Response:
    """POST /notifications/jackpot/reserve?notificationKey=K with the voucher JSON."""
    return await _notification(request.app[INGRESS], request)


async def _notification(ingress: Ingress, request: web.BaseRequest) -> web.Response:
    started = time.perf_counter()
    outcome = "error"
    voucher_id = coupon_id = state = request_id = None
    try:
        if not _content_type_ok(request):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, not {request.content_type!r}",
                outcome="unsupported",
            )
        try:
            claims = ingress.keys.verify(request.query.get("notificationKey"))
        except InvalidKey as error:
            raise ApiError(403, "forbidden", str(error), outcome="forbidden") from error
        request_id = claims.request_id
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise _too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as error:
            raise _too_large() from error
        voucher = parse_voucher(body)
        voucher_id, coupon_id, state = str(voucher.id), voucher.couponId, str(voucher.state)
        message = Outgoing(
            exchange=ingress.names.events,
            routing_key=voucher.route,
            body=body,
            message_id=f"{voucher_id}:{state}",
            correlation_id=voucher_id,
            headers=envelope.claim_headers(claims, int(time.time() * 1000)),
        )
        outcome = await _store(ingress, message)
        return _accepted(outcome, message.message_id)
    except ApiError as error:
        outcome = error.outcome
        raise
    finally:
        duration_s = time.perf_counter() - started
        metrics.INGRESS_REQUESTS.inc(outcome)
        metrics.INGRESS_SECONDS.observe(duration_s)
        log.info(
            "notification",
            voucher_id=voucher_id,
            coupon_id=coupon_id,
            state=state,
            doshii_request_id=request_id,
            outcome=outcome,
            duration_ms=round(duration_s * 1000, 3),
        )


async def receive_doshii_webhook(request: web.Request) -> web.Response:
    """POST /notifications/doshii: Doshii's webhook (Basic auth); a pending sale is published."""
    ingress = request.app[INGRESS]
    started = time.perf_counter()
    outcome = "error"
    event = request_id = location_id = None
    try:
        if ingress.webhook_auth.check(request.headers.get("Authorization")) is None:
            raise ApiError(
                401,
                "unauthorized",
                "Basic credentials are missing or not a registered key:token pair",
                outcome="unauthorized",
                headers={"WWW-Authenticate": WWW_AUTHENTICATE},
            )
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise _too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as error:
            raise _too_large() from error
        # An empty body is Doshii's verification check (its shape is undocumented): any type.
        if body.strip() and not _content_type_ok(request):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, not {request.content_type!r}",
                outcome="unsupported",
            )
        try:
            reading = read_webhook(body)
        except WebhookProblem as problem:
            raise ApiError(400, problem.error, problem.detail, outcome="invalid") from problem
        event = reading.event
        if reading.sale is None:
            outcome = "ignored"
            return web.json_response({"status": "ignored", "detail": reading.ignored})
        sale = reading.sale
        request_id, location_id = sale.id, sale.locationId
        received_ms = int(time.time() * 1000)
        intake = intake_request(sale, ingress.card_refs, _from_ms(received_ms))
        claims = KeyClaims(
            location_id=location_id, request_id=request_id, amount_cents=intake.amount_cents
        )
        message = Outgoing(
            exchange=ingress.names.events,
            routing_key=Route.CARD_ACTIVATE,
            body=intake.model_dump_json().encode(),
            message_id=intake_message_id(request_id),
            correlation_id=request_id,
            headers=envelope.claim_headers(claims, received_ms),
        )
        outcome = await _store(ingress, message)
        return _accepted(outcome, message.message_id)
    except ApiError as error:
        outcome = error.outcome
        raise
    finally:
        duration_s = time.perf_counter() - started
        metrics.DOSHII_WEBHOOKS.inc(outcome)
        log.info(
            "doshii_webhook",
            doshii_event=event,
            doshii_request_id=request_id,
            doshii_location_id=location_id,
            outcome=outcome,
            duration_ms=round(duration_s * 1000, 3),
        )


def _from_ms(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def _too_large() -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the body must be at most {MAX_BODY_BYTES} bytes",
        outcome="too_large",
    )


async def readyz(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    if ingress.publisher.ready and ingress.declared.is_set():
        if ingress.spool is not None and ingress.spool.depth:
            return web.json_response({"status": "degraded", "spooled": ingress.spool.depth})
        return web.json_response({"status": "ready"})
    if ingress.spool is not None and ingress.spool.writable:
        return web.json_response(
            {"status": "degraded", "detail": "broker unavailable; spooling notifications"}
        )
    return web.json_response(
        {"status": "unavailable", "detail": "no broker connection"}, status=503
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _as_json(
    request: web.BaseRequest, answer: Awaitable[web.StreamResponse]
) -> web.StreamResponse:
    """Await a handler's answer; every error becomes JSON: {"error": "...", "detail": ...}."""
    try:
        return await answer
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {k: v for k, v in error.headers.items() if k.lower() != "content-type"}
        slug = (error.reason or "error").lower().replace(" ", "_")
        return web.json_response(
            {"error": slug, "detail": error.text or error.reason},
            status=error.status,
            headers=headers,
        )
    except Exception:
        # A bug, not the caller's fault: say so in the same shape, and keep the trace in the log.
        log.exception("unhandled_error", path=request.path)
        return web.json_response(
            {"error": "internal_error", "detail": "the notification was not stored; retry later"},
            status=500,
        )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer of the application is JSON."""
    return await _as_json(request, handler(request))


class IngressRunner(web.AppRunner):
    """Serves the ingress application, handing the notification POST straight to its handler.

    On every request aiohttp's Application resolves the route, freezes the match and runs the
    middleware chain: in-process that was about 12 us of a notification's 44 us. The one hot
    route skips it with the same answers (errors rendered by the same code as the middleware);
    every other request, and any other method on that path, goes through the application.
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        ingress = self.app[INGRESS]
        through_app = server.request_handler

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            if request.method == "POST" and request.path == NOTIFICATION_PATH:
                return await _as_json(request, _notification(ingress, request))
            return await through_app(request)

        server.request_handler = handle
        return server


async def _declare_until_done(ingress: Ingress) -> None:
    while True:
        try:
            await declare_topology(ingress.settings)
        except Exception as error:
            # Any failure (a broker half up, a reset mid-handshake) is retried, never fatal.
            log.warning(
                "topology_declare_failed",
                error=f"{type(error).__name__}: {error}",
                retry_in_s=DECLARE_RETRY_S,
            )
            await asyncio.sleep(DECLARE_RETRY_S)
        else:
            ingress.declared.set()
            return


async def _broker_context(app: web.Application) -> AsyncIterator[None]:
    ingress = app[INGRESS]
    declaring = asyncio.create_task(_declare_until_done(ingress))
    try:
        await ingress.publisher.start()
    except BaseException:
        # A broker certificate that does not verify stops the ingress (never plain instead).
        declaring.cancel()
        raise
    if ingress.spool is not None:
        await ingress.spool.start(ingress.publisher)
    yield
    declaring.cancel()
    if ingress.spool is not None:
        await ingress.spool.stop()
    await ingress.publisher.close(ingress.settings.drain_timeout_s)


def create_app(
    settings: Settings, *, publisher: Publisher | None = None, spool: bool = True
) -> web.Application:
    """The ingress application; the same factory serves `bridge ingress`, tests and benchmarks."""
    if publisher is None:
        publisher = ConfirmedPublisher(
            settings.amqp_urls,
            ssl_context=ssl_context(settings),
            connect_timeout_s=settings.amqp_connect_timeout_s,
            confirm_timeout_s=settings.publish_timeout_s,
            connection_name=connection_name("ingress"),
            # A dead connection shows within two intervals; the default 30 s is too slow here.
            heartbeat_s=HEARTBEAT_S,
        )
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors])
    app[INGRESS] = Ingress(
        settings=settings,
        names=Names(settings.namespace),
        keys=KeyRing(settings.key_secrets),
        publisher=publisher,
        spool=(
            Spool(
                settings.spool_dir,
                max_bytes=settings.spool_max_bytes,
                adopt_interval_s=settings.spool_adopt_interval_s,
            )
            if spool and settings.spool_max_bytes
            else None
        ),
        declared=asyncio.Event(),
        webhook_auth=BasicAuth(settings.doshii_webhook_auth),
        card_refs=CardRefHasher(settings.key_secrets[0]),
    )
    runner: type[web.AppRunner] = IngressRunner
    app[service.RUNNER] = runner
    app.cleanup_ctx.append(_broker_context)
    app.router.add_post(NOTIFICATION_PATH, receive_notification)
    # Doshii's webhook is served only where its credentials are set: an ingress for Jackpot
    # alone needs none, and an open route with no credential to check would accept anyone.
    if settings.doshii_webhook_auth:
        app.router.add_post(DOSHII_WEBHOOK_PATH, receive_doshii_webhook)
    app.router.add_get("/healthz", service.healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", service.metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
