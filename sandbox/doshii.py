"""A Doshii look-alike for gift card activation requests: JWT auth, location scoping, state rules.

Routes, under `base_path` (Doshii's own `/partner/v3` by default), each needing
`authorization: Bearer <jwt>` and the request's `doshii-location-id`:

    GET /loyalty/cards/activation/{id}        the request's record
    PUT /loyalty/cards/activation/{id}        pending -> activated (with amount) | cancelled
    GET /loyalty/cards/activation/{id}/logs   the updates applied
    POST /webhooks                            register {event, webhookUrl, authenticationKey,
                                              authenticationToken} (per location with the header)
    GET /webhooks, GET|PUT|DELETE /webhooks/{event}

Selling a card at the till (`sell_card`, then `deliver_sale`) creates a pending request and
delivers `card_activate` to the webhook registered for it, with `Authorization: Basic
base64(key:token)`, retrying any answer but a 2xx like Doshii: a bounded number of times, with
growing waits (Doshii's are 1 min, 3 min, ...; the sandbox's are shorter, and set).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import string
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import jwt
from aiohttp import web

from sandbox.faults import FaultRoute, Faults, error_name
from sandbox.timestamps import iso_z, parse_iso, utcnow

DOSHII_BASE_PATH = "/partner/v3"
# Doshii rejects tokens older than about ten minutes.
MAX_TOKEN_AGE_S = 600.0
# A token from a client whose clock runs a little fast is still accepted.
MAX_CLOCK_SKEW_S = 60.0
LOCATION_ID_CHARS = 7
STATUS_WAIT_S = 10.0
_DIGITS = re.compile(r"[0-9]+")
_OPTIONAL_TEXT_FIELDS = ("reference", "cancelledReason")
CARD_ACTIVATE = "card_activate"
# Doshii retries a webhook up to 10 times; it wants a 2xx within 10 s.
WEBHOOK_RETRIES = 10
WEBHOOK_ATTEMPT_TIMEOUT_S = 10.0
# Doshii waits 1 min, then 3 min, ...; the sandbox keeps that growth (x3) but starts at 1 s,
# so a demo sees its retries within seconds; tests set their own.
WEBHOOK_FIRST_BACKOFF_S = 1.0
WEBHOOK_BACKOFF_FACTOR = 3.0
WEBHOOK_MAX_BACKOFF_S = 30.0
DEFAULT_SALE_CENTS = 2500


@dataclass(frozen=True)
class Webhook:
    """A registered webhook: where an event goes, and the Basic credentials it carries."""

    event: str
    url: str
    authentication_key: str | None = None
    authentication_token: str | None = None
    location_id: str | None = None  # None: every location of the app

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"event": self.event, "webhookUrl": self.url}
        if self.authentication_key is not None:
            body["authenticationKey"] = self.authentication_key
        if self.location_id is not None:
            body["locationId"] = self.location_id
        return body


@dataclass(frozen=True)
class WebhookAttempt:
    """One POST of a webhook to the app, as Doshii would log it."""

    request_id: str
    event: str
    attempt: int
    status: int  # 0 when there was no answer (connection error or timeout)
    error: str | None
    at_s: float


class Status(StrEnum):
    """Activation request statuses; others (`rejected`, `complete`) may be set for tests."""

    PENDING = "pending"
    ACTIVATED = "activated"
    CANCELLED = "cancelled"


_UPDATE_STATUSES = frozenset({Status.ACTIVATED.value, Status.CANCELLED.value})


class DoshiiSandbox:
    """The state of a Doshii look-alike; `create_app(sandbox)` serves it over HTTP."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        max_token_age_s: float = MAX_TOKEN_AGE_S,
        max_clock_skew_s: float = MAX_CLOCK_SKEW_S,
        base_path: str = DOSHII_BASE_PATH,
        public_base_url: str | None = None,
        faults: Faults | None = None,
        webhook_retries: int = WEBHOOK_RETRIES,
        webhook_first_backoff_s: float = WEBHOOK_FIRST_BACKOFF_S,
        webhook_max_backoff_s: float = WEBHOOK_MAX_BACKOFF_S,
        webhook_timeout_s: float = WEBHOOK_ATTEMPT_TIMEOUT_S,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.max_token_age_s = max_token_age_s
        self.max_clock_skew_s = max_clock_skew_s
        self.base_path = base_path.rstrip("/")
        # Where this sandbox is reachable (`http://127.0.0.1:PORT`), set when it is started.
        self.public_base_url = public_base_url
        self.faults = faults if faults is not None else Faults()
        # Records as GET answers them, without `uri` and `log` (added when answering).
        self.requests: dict[str, dict[str, Any]] = {}
        self.locations: dict[str, str] = {}
        # Every PUT received per request id, accepted or not: {"body", "status", "at"}.
        # `body` is the parsed JSON, or the raw text when it is not JSON; `status` 0 = dropped.
        self.puts: dict[str, list[dict[str, Any]]] = {}
        self.logs: dict[str, list[dict[str, Any]]] = {}
        self._next_id = 100_000 + secrets.randbelow(800_000)
        self._waiters: dict[str, asyncio.Event] = {}
        self.webhooks: dict[tuple[str, str | None], Webhook] = {}
        # The till's events, kept to deliver again (`requestData` exists only in them).
        self.sales: dict[str, dict[str, Any]] = {}
        self.webhook_deliveries: list[WebhookAttempt] = []
        self.webhook_retries = webhook_retries
        self.webhook_first_backoff_s = webhook_first_backoff_s
        self.webhook_max_backoff_s = webhook_max_backoff_s
        self.webhook_timeout_s = webhook_timeout_s
        self._client: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[int]] = set()

    @property
    def api_url(self) -> str:
        """The base URL a client is configured with (`BRIDGE_DOSHII_API_URL`)."""
        return f"{self.public_base_url or ''}{self.base_path}"

    def create_request(
        self, location_id: str | None = None, amount_cents: int | None = None
    ) -> str:
        """A new pending activation request, as a POS makes one; returns its id.

        `location_id` defaults to a random hashed-looking id (7 alphanumerics); `amount_cents`,
        when given, shows as the record's `amount`.
        """
        request_id = str(self._next_id)
        self._next_id += 1
        location = location_id if location_id is not None else _random_location_id()
        now = iso_z(utcnow())
        record: dict[str, Any] = {
            "id": request_id,
            "type": "giftcard",
            "event": "card_activate",
            "orderId": str(secrets.randbelow(10**6)),
            "status": Status.PENDING.value,
            "createdAt": now,
            "updatedAt": now,
        }
        if amount_cents is not None:
            record["amount"] = str(amount_cents)
        self.requests[request_id] = record
        self.locations[request_id] = location
        self.logs[request_id] = []
        return request_id

    # The till and webhooks

    def register_webhook(self, webhook: Webhook) -> None:
        """Register (or replace) where `webhook.event` goes, for one location or for all."""
        self.webhooks[(webhook.event, webhook.location_id)] = webhook

    def webhook_for(self, event: str, location_id: str) -> Webhook | None:
        """The location's own webhook for `event`, else the app's."""
        return self.webhooks.get((event, location_id)) or self.webhooks.get((event, None))

    def sell_card(
        self,
        *,
        location_id: str | None = None,
        amount_cents: int = DEFAULT_SALE_CENTS,
        card_ref: str | None = None,
        pos_terminal_id: str | None = None,
    ) -> str:
        """The till sells a gift card: a pending request and its `card_activate` event.

        The event's card provider credentials are random, so a test can look for them.
        Returns the request id; `deliver_sale` sends the event.
        """
        request_id = self.create_request(location_id, amount_cents)
        location = self.locations[request_id]
        request_data: dict[str, Any] = {
            "cardRef": card_ref if card_ref is not None else _random_card_ref(),
            "amount": str(amount_cents),
            "cardAuthorisationKey": f"{secrets.randbelow(10**4):04d}",
            "cardProviderAuthId": f"till-user-{secrets.token_hex(4)}",
            "cardProviderAuthPassword": f"till-pw-{secrets.token_hex(8)}",
        }
        data: dict[str, Any] = {
            "id": request_id,
            "locationId": location,
            "status": Status.PENDING.value,
            "posTerminalId": pos_terminal_id or f"{secrets.randbelow(16**6):06x}",
            "requestData": request_data,
            "uri": f"{self.api_url}/loyalty/cards/activation/{request_id}",
        }
        self.sales[request_id] = {"event": CARD_ACTIVATE, "data": data}
        return request_id

    async def deliver_sale(self, request_id: str) -> int:
        """POST the sale's `card_activate` to its webhook, retrying non-2xx answers like Doshii.

        Returns the last attempt's status (0: no answer); every attempt is in
        `webhook_deliveries`. A sale with no webhook registered raises LookupError.
        """
        event = self.sales[request_id]
        location = self.locations[request_id]
        webhook = self.webhook_for(CARD_ACTIVATE, location)
        if webhook is None:
            raise LookupError(f"no {CARD_ACTIVATE} webhook registered for location {location}")
        headers = {"Content-Type": "application/json"}
        if webhook.authentication_key is not None and webhook.authentication_token is not None:
            pair = f"{webhook.authentication_key}:{webhook.authentication_token}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"
        body = json.dumps(event).encode()
        backoff_s = self.webhook_first_backoff_s
        status = 0
        for attempt in range(1, self.webhook_retries + 2):  # the first try, then the retries
            status, error = await self._post(webhook.url, body, headers)
            self.webhook_deliveries.append(
                WebhookAttempt(request_id, CARD_ACTIVATE, attempt, status, error, time.time())
            )
            if 200 <= status < 300 or attempt > self.webhook_retries:
                break
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * WEBHOOK_BACKOFF_FACTOR, self.webhook_max_backoff_s)
        return status

    def start_delivery(self, request_id: str) -> asyncio.Task[int]:
        """Deliver the sale in the background (as Doshii does); the task gives the last status."""
        task = asyncio.get_running_loop().create_task(self.deliver_sale(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
        if self._client is None or self._client.closed:
            self._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        timeout = aiohttp.ClientTimeout(total=self.webhook_timeout_s)
        try:
            async with self._client.post(url, data=body, headers=headers, timeout=timeout) as r:
                await r.read()
                return r.status, None
        except (aiohttp.ClientError, TimeoutError) as error:
            return 0, f"{type(error).__name__}: {error}"

    async def aclose(self) -> None:
        """Stop delivering webhooks and close their HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    def record(self, request_id: str) -> dict[str, Any]:
        """The request's JSON as `GET ~/loyalty/cards/activation/{id}` answers it."""
        uri = f"{self.api_url}/loyalty/cards/activation/{request_id}"
        return {**self.requests[request_id], "uri": uri, "log": f"{uri}/logs"}

    def set_status(self, request_id: str, status: str) -> None:
        """Force a request's status, as the till would (cancelled while its voucher was paid)."""
        record = self.requests[request_id]
        record["status"] = str(status)
        record["updatedAt"] = iso_z(utcnow())
        self._wake(request_id)

    async def wait_for_status(
        self, request_id: str, *statuses: str, timeout_s: float = STATUS_WAIT_S
    ) -> str:
        """Wait until the request is in one of `statuses`; returns it, or raises TimeoutError."""
        wanted = {str(status) for status in statuses}
        return await self._wait_until(request_id, lambda status: status in wanted, timeout_s)

    async def _wait_until(
        self, request_id: str, predicate: Callable[[str], bool], timeout_s: float
    ) -> str:
        async with asyncio.timeout(timeout_s):
            while not predicate(status := str(self.requests[request_id]["status"])):
                await self._waiters.setdefault(request_id, asyncio.Event()).wait()
        return status

    def _wake(self, request_id: str) -> None:
        waiter = self._waiters.pop(request_id, None)
        if waiter is not None:
            waiter.set()

    def token_problem(self, authorization: str | None) -> str | None:
        """Why the `authorization` header is refused, or None if it is a valid token of ours."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Missing bearer token"
        try:
            # The client's secret length is the client's business: PyJWT's short-key warning
            # must not turn into a server error here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                claims = jwt.decode(token.strip(), self.client_secret, algorithms=["HS256"])
        except jwt.InvalidSignatureError:
            return "Invalid token signature"
        except jwt.PyJWTError as error:
            return f"Invalid token: {error}"
        if claims.get("clientId") != self.client_id:
            return "Unknown clientId"
        timestamp = claims.get("timestamp")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
            return "Token has no numeric timestamp"
        age_s = time.time() - timestamp
        if age_s > self.max_token_age_s:
            return "Token has expired"
        if -age_s > self.max_clock_skew_s:
            return "Token timestamp is in the future"
        return None

    def apply_update(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Apply a validated update to a pending request; returns the log entry it adds."""
        record = self.requests[request_id]
        previous = record["status"]
        now = iso_z(utcnow())
        changes: dict[str, Any] = {"status": body["status"]}
        if body.get("amount") is not None:
            changes["amount"] = str(int(body["amount"]))
        for name in ("expiryDate", *_OPTIONAL_TEXT_FIELDS):
            if body.get(name) is not None:
                changes[name] = body[name]
        record.update(changes)
        record["processedByApp"] = self.client_id
        record["updatedAt"] = now
        entry: dict[str, Any] = {
            "createdAt": now,
            "appId": self.client_id,
            "previousStatus": previous,
            **changes,
        }
        if isinstance(body.get("log"), dict):
            entry["log"] = body["log"]
        self.logs[request_id].append(entry)
        self._wake(request_id)
        return entry


def update_problem(body: object) -> str | None:
    """Why a PUT body is refused with 400 (naming the field), or None if it is acceptable."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    status = body.get("status")
    if not isinstance(status, str) or status not in _UPDATE_STATUSES:
        return "status must be 'activated' or 'cancelled'"
    amount = body.get("amount")
    if amount is None:
        if status == Status.ACTIVATED:
            return "amount is required when status is 'activated'"
    elif not _is_cents(amount):
        return "amount must be a whole number of cents, as an integer or a string of digits"
    event = body.get("event")
    if event is not None and event != "card_activate":
        return "event must be 'card_activate'"
    expiry = body.get("expiryDate")
    if expiry is not None:
        if not isinstance(expiry, str):
            return "expiryDate must be an ISO 8601 date string"
        try:
            parse_iso(expiry)
        except ValueError:
            return "expiryDate must be an ISO 8601 date string"
    for name in _OPTIONAL_TEXT_FIELDS:
        if body.get(name) is not None and not isinstance(body[name], str):
            return f"{name} must be a string"
    if body.get("log") is not None and not isinstance(body["log"], dict):
        return "log must be an object"
    return None


def _is_cents(amount: object) -> bool:
    if isinstance(amount, bool):
        return False
    if isinstance(amount, int):
        return amount >= 0
    return isinstance(amount, str) and _DIGITS.fullmatch(amount) is not None


def _random_card_ref() -> str:
    digits = f"{secrets.randbelow(10**12):012d}"
    return f"{digits[:4]}-{digits[4:8]}-{digits[8:]}"


def _random_location_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(LOCATION_ID_CHARS))


DOSHII = web.AppKey("doshii", DoshiiSandbox)


def create_app(sandbox: DoshiiSandbox) -> web.Application:
    """The aiohttp application serving `sandbox` under its `base_path`."""
    app = web.Application()
    app[DOSHII] = sandbox
    route = f"{sandbox.base_path}/loyalty/cards/activation/{{request_id}}"
    app.router.add_get(route, _get)
    app.router.add_put(route, _put)
    app.router.add_get(f"{route}/logs", _logs)
    webhooks = f"{sandbox.base_path}/webhooks"
    app.router.add_post(webhooks, _register_webhook)
    app.router.add_get(webhooks, _list_webhooks)
    app.router.add_get(f"{webhooks}/{{event}}", _get_webhook)
    app.router.add_put(f"{webhooks}/{{event}}", _register_webhook)
    app.router.add_delete(f"{webhooks}/{{event}}", _delete_webhook)
    app.on_cleanup.append(_close_client)
    return app


async def _close_client(app: web.Application) -> None:
    await app[DOSHII].aclose()


def webhook_problem(body: object) -> str | None:
    """Why a webhook registration is refused with 400, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name in ("event", "webhookUrl"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} must be a non-empty string"
    if not str(body["webhookUrl"]).startswith(("http://", "https://")):
        return "webhookUrl must be an http(s) URL"
    for name in ("authenticationKey", "authenticationToken"):
        if body.get(name) is not None and not isinstance(body[name], str):
            return f"{name} must be a string"
    if (body.get("authenticationKey") is None) != (body.get("authenticationToken") is None):
        return "authenticationKey and authenticationToken go together"
    return None


async def _register_webhook(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[DOSHII]
    problem = sandbox.token_problem(request.headers.get("authorization"))
    if problem is not None:
        return _error(401, problem)
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _error(400, "body must be JSON")
    if isinstance(body, dict) and "event" in request.match_info:
        body = {**body, "event": request.match_info["event"]}
    if (refused := webhook_problem(body)) is not None:
        return _error(400, refused)
    webhook = Webhook(
        event=body["event"],
        url=body["webhookUrl"],
        authentication_key=body.get("authenticationKey"),
        authentication_token=body.get("authenticationToken"),
        location_id=request.headers.get("doshii-location-id"),
    )
    sandbox.register_webhook(webhook)
    return web.json_response(webhook.as_json(), status=201 if request.method == "POST" else 200)


async def _list_webhooks(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[DOSHII]
    if (problem := sandbox.token_problem(request.headers.get("authorization"))) is not None:
        return _error(401, problem)
    return web.json_response([hook.as_json() for hook in sandbox.webhooks.values()])


def _webhook_key(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["event"], request.headers.get("doshii-location-id")


async def _get_webhook(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[DOSHII]
    if (problem := sandbox.token_problem(request.headers.get("authorization"))) is not None:
        return _error(401, problem)
    webhook = sandbox.webhooks.get(_webhook_key(request))
    if webhook is None:
        return _error(404, f"No webhook for {request.match_info['event']}")
    return web.json_response(webhook.as_json())


async def _delete_webhook(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[DOSHII]
    if (problem := sandbox.token_problem(request.headers.get("authorization"))) is not None:
        return _error(401, problem)
    if sandbox.webhooks.pop(_webhook_key(request), None) is None:
        return _error(404, f"No webhook for {request.match_info['event']}")
    return web.Response(status=204)


def _error(status: int, message: str) -> web.Response:
    body = {"statusCode": status, "name": error_name(status), "message": message}
    return web.json_response(body, status=status)


def _refusal(request: web.Request, sandbox: DoshiiSandbox) -> web.Response | None:
    """401 for a bad token, then 404 for an unknown request or another location's."""
    problem = sandbox.token_problem(request.headers.get("authorization"))
    if problem is not None:
        return _error(401, problem)
    request_id = request.match_info["request_id"]
    location = sandbox.locations.get(request_id)
    if location is None or request.headers.get("doshii-location-id") != location:
        return _error(404, f"Card activation request {request_id} not found")
    return None


async def _get(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[DOSHII]
    if (fault := await sandbox.faults.apply(FaultRoute.DOSHII_GET, request)) is not None:
        return fault
    if (refused := _refusal(request, sandbox)) is not None:
        return refused
    return web.json_response(sandbox.record(request.match_info["request_id"]))


async def _logs(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[DOSHII]
    if (refused := _refusal(request, sandbox)) is not None:
        return refused
    return web.json_response(sandbox.logs[request.match_info["request_id"]])


async def _put(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[DOSHII]
    request_id = request.match_info["request_id"]
    raw = await request.read()
    body: object
    try:
        body, is_json = json.loads(raw), True
    except ValueError:
        body, is_json = raw.decode("utf-8", errors="replace"), False
    entry: dict[str, Any] = {"body": body, "status": 0, "at": iso_z(utcnow())}
    sandbox.puts.setdefault(request_id, []).append(entry)
    response = await _put_answer(request, sandbox, request_id, body, is_json=is_json)
    dropped = request.transport is None or request.transport.is_closing()
    entry["status"] = 0 if dropped else response.status
    return response


async def _put_answer(
    request: web.Request, sandbox: DoshiiSandbox, request_id: str, body: object, *, is_json: bool
) -> web.StreamResponse:
    if (fault := await sandbox.faults.apply(FaultRoute.DOSHII_PUT, request)) is not None:
        return fault
    if (refused := _refusal(request, sandbox)) is not None:
        return refused
    if request.content_type != "application/json" or not is_json:
        return _error(400, "body must be JSON, sent as content-type application/json")
    problem = update_problem(body)
    if problem is not None or not isinstance(body, dict):
        return _error(400, problem or "body must be a JSON object")
    status = sandbox.requests[request_id]["status"]
    if status != Status.PENDING:
        return _error(409, f"Request is already {status}")
    sandbox.apply_update(request_id, body)
    return web.json_response(sandbox.record(request_id))
