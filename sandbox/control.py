"""HTTP control routes under `/_sandbox`, so another process (the demo, a benchmark) can drive the
sandboxes the way tests drive them in Python. No auth: they answer loopback clients only.

Jackpot app:  POST /_sandbox/reservations                 -> the voucher JSON
              GET  /_sandbox/vouchers/{id}                -> voucher, call counters, deliveries
              PUT  /_sandbox/vouchers/{id}/state          {state}
              POST /_sandbox/vouchers/{id}/notify         -> {"status": final status}
              POST /_sandbox/vouchers/{id}/deliver        -> {"reserved_status", "ready_status",
                                                              "state"}
              PUT  /_sandbox/notification-url             {url}: reserveNotificationUrl
              GET  /_sandbox/catalogue                    -> stores, offers with stock, sessions
              PUT  /_sandbox/offers/{store}/{offer}/stock {stock}
Doshii app:   POST /_sandbox/requests                     -> {"id", "locationId"}
              GET  /_sandbox/requests/{id}                -> record, locationId, puts, logs,
                                                             webhookDeliveries
              PUT  /_sandbox/requests/{id}/status         {status}
              POST /_sandbox/webhooks                     {event, webhook_url, authentication_key,
                                                             authentication_token, location_id}
              POST /_sandbox/till                         {location_id, amount_cents, card_ref,
                                                             wait} -> {"id", "locationId",
                                                             "deliveryStatus" (when waited)}
              POST /_sandbox/requests/{id}/deliver        {wait}: send the sale's event again
Both apps:    GET / POST / DELETE /_sandbox/faults        (faults are shared by both sandboxes)
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox.doshii import CARD_ACTIVATE, DEFAULT_SALE_CENTS, DOSHII, Webhook
from sandbox.faults import Fault, Faults
from sandbox.jackpot import CONFIRM_WAIT_S, JACKPOT, NOTIFY_RETRY_WINDOW_S

CONTROL_PREFIX = "/_sandbox"
FAULTS = web.AppKey("faults", Faults)

_Model = TypeVar("_Model", bound=BaseModel)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReservationIn(_Body):
    notification_url: str
    notification_key: str
    value: Decimal = Decimal(110)
    price: Decimal = Decimal(150)
    coupon_id: str | None = None
    voucher_id: UUID | None = None
    validity_date: datetime | None = None


class StateIn(_Body):
    state: str = Field(min_length=1)


class NotifyIn(_Body):
    state: str | None = None
    expired_link: bool = False
    signed_url: str | None = None
    extra: dict[str, Any] | None = None
    retry_window_s: float = Field(NOTIFY_RETRY_WINDOW_S, ge=0)


class DeliverIn(_Body):
    force: bool = False
    confirm_timeout_s: float = Field(CONFIRM_WAIT_S, ge=0)
    expired_link: bool = False
    signed_url: str | None = None
    extra: dict[str, Any] | None = None
    retry_window_s: float = Field(NOTIFY_RETRY_WINDOW_S, ge=0)


class FaultIn(_Body):
    route: str
    status: int | None = None
    times: int = 1
    retry_after_s: float | None = None
    delay_s: float = 0.0
    drop: bool = False


class RequestIn(_Body):
    location_id: str | None = Field(None, min_length=1)
    amount_cents: int | None = Field(None, ge=0)


class StatusIn(_Body):
    status: str = Field(min_length=1)


class NotificationUrlIn(_Body):
    url: str | None = None


class StockIn(_Body):
    stock: int = Field(ge=0)


class WebhookIn(_Body):
    event: str = Field(CARD_ACTIVATE, min_length=1)
    webhook_url: str = Field(pattern=r"^https?://")
    authentication_key: str | None = None
    authentication_token: str | None = None
    location_id: str | None = None


class SaleIn(_Body):
    location_id: str | None = Field(None, min_length=1)
    amount_cents: int = Field(DEFAULT_SALE_CENTS, ge=1)
    card_ref: str | None = None
    pos_terminal_id: str | None = None
    wait: bool = False  # answer once the delivery ended, with its last status


class DeliverSaleIn(_Body):
    wait: bool = True


def _is_loopback(remote: str | None) -> bool:
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _error(status: int, error: str, detail: object = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


@web.middleware
async def _guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
    if not _is_loopback(request.remote):
        return _error(403, "control routes answer loopback clients only")
    try:
        return await handler(request)
    except ValidationError as error:
        return _error(400, "invalid body", json.loads(error.json(include_url=False)))
    except ValueError as error:
        return _error(400, "invalid request", str(error))


async def _body(request: web.Request, model: type[_Model]) -> _Model:
    raw = await request.read()
    return model.model_validate_json(raw or b"{}")


def _controls() -> web.Application:
    app = web.Application(middlewares=[_guard])
    app.router.add_get("/faults", _get_faults)
    app.router.add_post("/faults", _set_fault)
    app.router.add_delete("/faults", _clear_faults)
    return app


def add_jackpot_controls(app: web.Application) -> None:
    """Mount the Jackpot control routes on the app made by `sandbox.jackpot.create_app`."""
    controls = _controls()
    controls[FAULTS] = app[JACKPOT].faults
    controls.router.add_post("/reservations", _reserve)
    controls.router.add_get("/vouchers/{voucher_id}", _voucher)
    controls.router.add_put("/vouchers/{voucher_id}/state", _set_state)
    controls.router.add_post("/vouchers/{voucher_id}/notify", _notify)
    controls.router.add_post("/vouchers/{voucher_id}/deliver", _deliver)
    controls.router.add_put("/notification-url", _set_notification_url)
    controls.router.add_get("/catalogue", _catalogue)
    controls.router.add_put("/offers/{store_id}/{offer_id}/stock", _set_stock)
    app.add_subapp(CONTROL_PREFIX, controls)


def add_doshii_controls(app: web.Application) -> None:
    """Mount the Doshii control routes on the app made by `sandbox.doshii.create_app`."""
    controls = _controls()
    controls[FAULTS] = app[DOSHII].faults
    controls.router.add_post("/requests", _create_request)
    controls.router.add_get("/requests/{request_id}", _request)
    controls.router.add_put("/requests/{request_id}/status", _set_status)
    controls.router.add_post("/webhooks", _register_webhook)
    controls.router.add_post("/till", _sell)
    controls.router.add_post("/requests/{request_id}/deliver", _deliver_sale)
    app.add_subapp(CONTROL_PREFIX, controls)


# Faults


async def _get_faults(request: web.Request) -> web.StreamResponse:
    faults = request.app[FAULTS]
    return web.json_response({"calls": dict(faults.calls), "injected": dict(faults.injected)})


async def _set_fault(request: web.Request) -> web.StreamResponse:
    body = await _body(request, FaultIn)
    fault = Fault(
        status=body.status,
        times=body.times,
        retry_after_s=body.retry_after_s,
        delay_s=body.delay_s,
        drop=body.drop,
    )
    request.app[FAULTS].set(body.route, fault)
    return web.json_response({"route": body.route, **asdict(fault)})


async def _clear_faults(request: web.Request) -> web.StreamResponse:
    request.app[FAULTS].clear(request.query.get("route"))
    return web.json_response({"cleared": request.query.get("route", "all")})


# Jackpot


async def _reserve(request: web.Request) -> web.StreamResponse:
    body = await _body(request, ReservationIn)
    voucher = request.config_dict[JACKPOT].reserve(
        notification_url=body.notification_url,
        notification_key=body.notification_key,
        value=body.value,
        price=body.price,
        coupon_id=body.coupon_id,
        voucher_id=body.voucher_id,
        validity_date=body.validity_date,
    )
    return web.json_response(voucher)


def _voucher_id(request: web.Request) -> str | None:
    voucher_id = request.match_info["voucher_id"]
    return voucher_id if voucher_id in request.config_dict[JACKPOT].vouchers else None


def _unknown(kind: str, ident: str) -> web.Response:
    return _error(404, f"unknown {kind}", ident)


async def _voucher(request: web.Request) -> web.StreamResponse:
    jackpot = request.config_dict[JACKPOT]
    vid = _voucher_id(request)
    if vid is None:
        return _unknown("voucher", request.match_info["voucher_id"])
    return web.json_response(
        {
            "voucher": jackpot.vouchers[vid],
            "confirmCalls": jackpot.confirm_calls[vid],
            "cancelCalls": jackpot.cancel_calls[vid],
            "signedurlCalls": jackpot.signedurl_calls[vid],
            "pdfDownloads": jackpot.pdf_downloads[vid],
            "deliveries": [asdict(d) for d in jackpot.deliveries if d.voucher_id == vid],
        }
    )


async def _set_state(request: web.Request) -> web.StreamResponse:
    vid = _voucher_id(request)
    if vid is None:
        return _unknown("voucher", request.match_info["voucher_id"])
    body = await _body(request, StateIn)
    jackpot = request.config_dict[JACKPOT]
    jackpot.set_state(vid, body.state)
    return web.json_response(jackpot.vouchers[vid])


async def _notify(request: web.Request) -> web.StreamResponse:
    vid = _voucher_id(request)
    if vid is None:
        return _unknown("voucher", request.match_info["voucher_id"])
    body = await _body(request, NotifyIn)
    status = await request.config_dict[JACKPOT].notify(
        vid,
        body.state,
        expired_link=body.expired_link,
        signed_url=body.signed_url,
        extra=body.extra,
        retry_window_s=body.retry_window_s,
    )
    return web.json_response({"status": status})


async def _deliver(request: web.Request) -> web.StreamResponse:
    vid = _voucher_id(request)
    if vid is None:
        return _unknown("voucher", request.match_info["voucher_id"])
    body = await _body(request, DeliverIn)
    outcome = await request.config_dict[JACKPOT].deliver(
        vid,
        force=body.force,
        confirm_timeout_s=body.confirm_timeout_s,
        expired_link=body.expired_link,
        signed_url=body.signed_url,
        extra=body.extra,
        retry_window_s=body.retry_window_s,
    )
    return web.json_response(asdict(outcome))


# Doshii


async def _create_request(request: web.Request) -> web.StreamResponse:
    body = await _body(request, RequestIn)
    doshii = request.config_dict[DOSHII]
    request_id = doshii.create_request(body.location_id, body.amount_cents)
    return web.json_response({"id": request_id, "locationId": doshii.locations[request_id]})


async def _request(request: web.Request) -> web.StreamResponse:
    doshii = request.config_dict[DOSHII]
    request_id = request.match_info["request_id"]
    if request_id not in doshii.requests:
        return _unknown("request", request_id)
    return web.json_response(
        {
            **doshii.record(request_id),
            "locationId": doshii.locations[request_id],
            "puts": doshii.puts.get(request_id, []),
            "logs": doshii.logs[request_id],
            "webhookDeliveries": [
                asdict(d) for d in doshii.webhook_deliveries if d.request_id == request_id
            ],
        }
    )


async def _set_status(request: web.Request) -> web.StreamResponse:
    doshii = request.config_dict[DOSHII]
    request_id = request.match_info["request_id"]
    if request_id not in doshii.requests:
        return _unknown("request", request_id)
    body = await _body(request, StatusIn)
    doshii.set_status(request_id, body.status)
    return web.json_response(doshii.record(request_id))


async def _set_notification_url(request: web.Request) -> web.StreamResponse:
    body = await _body(request, NotificationUrlIn)
    request.config_dict[JACKPOT].reserve_notification_url = body.url
    return web.json_response({"url": body.url})


async def _catalogue(request: web.Request) -> web.StreamResponse:
    jackpot = request.config_dict[JACKPOT]
    return web.json_response(
        {
            "stores": [store.as_json() for store in jackpot.catalogue.values()],
            "offers": [
                o.as_json() for st in jackpot.catalogue.values() for o in st.offers.values()
            ],
            "tokenCalls": jackpot.token_calls,
            "reserveCalls": jackpot.reserve_calls,
            "sessions": len(jackpot.sessions),
        }
    )


async def _set_stock(request: web.Request) -> web.StreamResponse:
    jackpot = request.config_dict[JACKPOT]
    store = jackpot.catalogue.get(request.match_info["store_id"])
    offer = store.offers.get(request.match_info["offer_id"]) if store is not None else None
    if offer is None:
        return _unknown("offer", request.match_info["offer_id"])
    offer.stock = (await _body(request, StockIn)).stock
    return web.json_response(offer.as_json())


async def _register_webhook(request: web.Request) -> web.StreamResponse:
    body = await _body(request, WebhookIn)
    webhook = Webhook(
        event=body.event,
        url=body.webhook_url,
        authentication_key=body.authentication_key,
        authentication_token=body.authentication_token,
        location_id=body.location_id,
    )
    request.config_dict[DOSHII].register_webhook(webhook)
    return web.json_response(webhook.as_json())


async def _sell(request: web.Request) -> web.StreamResponse:
    body = await _body(request, SaleIn)
    doshii = request.config_dict[DOSHII]
    request_id = doshii.sell_card(
        location_id=body.location_id,
        amount_cents=body.amount_cents,
        card_ref=body.card_ref,
        pos_terminal_id=body.pos_terminal_id,
    )
    answer: dict[str, object] = {"id": request_id, "locationId": doshii.locations[request_id]}
    if doshii.webhook_for(CARD_ACTIVATE, doshii.locations[request_id]) is None:
        return _error(409, "no card_activate webhook registered", answer)
    delivery = doshii.start_delivery(request_id)
    if body.wait:
        answer["deliveryStatus"] = await delivery
    return web.json_response(answer)


async def _deliver_sale(request: web.Request) -> web.StreamResponse:
    doshii = request.config_dict[DOSHII]
    request_id = request.match_info["request_id"]
    if request_id not in doshii.sales:
        return _unknown("sale", request_id)
    body = await _body(request, DeliverSaleIn)
    if doshii.webhook_for(CARD_ACTIVATE, doshii.locations[request_id]) is None:
        return _error(409, "no card_activate webhook registered", request_id)
    delivery = doshii.start_delivery(request_id)
    answer: dict[str, object] = {"id": request_id}
    if body.wait:
        answer["deliveryStatus"] = await delivery
    return web.json_response(answer)
