"""A Jackpot look-alike: vouchers with Jackpot's state rules, signed PDF links that expire, and
notifications delivered (and retried) the way Jackpot delivers them.

Routes (those under "apikey" need `apikey: <api_key>`, those under "session" a Bearer token):

    apikey   PUT /v2/voucher/{id}/confirm      RESERVED -> CONFIRMED
             PUT /v2/voucher/{id}/cancel       RESERVED -> CANCELED (its stock comes back)
             GET /v2/vouchers/{id}/signedurl   a fresh signed PDF link
    none     POST /v2/token                    a signed JWT (once only) -> a session token
    either   GET /v2/stores, /v2/stores/proposed-vouchers, /v2/stores/{store}/proposed-vouchers,
             /v2/stores/{store}/offers/{offer}
    session  POST /v2/stores/{store}/offers/{offer}/reserve-voucher-by-value  {"value": N}
             POST /v2/stores/{store}/offers/{offer}/reserve-voucher-by-price  {"price": N}
    none     GET /pdf/{id}.pdf?expires=&signature=   the PDF, S3-style 403 XML when expired

A session ends after one reservation or an hour. A voucher reserved through a session is
notified as Jackpot does, to `reserve_notification_url?notificationKey=<the JWT's key>`:
RESERVED at once, READY once confirmed (by `PUT .../confirm`, or, when the JWT did not ask for
`forceManualConfirm`, by the 200 to RESERVED), each retried a bounded number of times.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import math
import random
import secrets
import string
import time
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID, uuid4

import aiohttp
import jwt
from aiohttp import web
from yarl import URL

from sandbox.catalogue import Offer, Store, default_catalogue
from sandbox.faults import FaultRoute, Faults
from sandbox.timestamps import iso_z, parse_iso, utcnow

# Jackpot documents its signed links as "valid for one hour".
LINK_TTL_S = 3600.0
# An expired link on demand expired a minute ago, so no rounding of clocks can revive it.
EXPIRED_LINK_AGE_S = 60
# The docs' example: resaExpireDate is two days after reservationDate.
RESERVATION_TTL = timedelta(days=2)
# Default validity of a new voucher; the docs' example is about seven months, a year is as good.
VALIDITY = timedelta(days=365)
COUPON_ID_CHARS = 10
# Jackpot retries a notification with exponential backoff for five minutes.
NOTIFY_RETRY_WINDOW_S = 300.0
NOTIFY_FIRST_BACKOFF_S = 0.2
NOTIFY_MAX_BACKOFF_S = 5.0
# How long one notification attempt may take before it counts as unanswered.
NOTIFY_ATTEMPT_TIMEOUT_S = 10.0
# How long `deliver` waits for the bridge to confirm a reservation it agreed to.
CONFIRM_WAIT_S = 10.0

# Sessions: Jackpot's documented lifetime, and how old a JWT may be when it is exchanged.
SESSION_TTL_S = 3600.0
MAX_ASSERTION_AGE_S = 600.0
MAX_ASSERTION_SKEW_S = 60.0
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Notifications of session-reserved vouchers: retried, but not forever (a bridge may be gone).
AUTO_NOTIFY_ATTEMPTS = 8
AUTO_NOTIFY_WINDOW_S = 60.0

SignedUrlShape = Literal["signedUrl", "url", "bare"]
TokenField = Literal["access_token", "accessToken", "token"]


@dataclass
class Session:
    """A client session opened at POST /v2/token from one signed JWT."""

    token: str
    notification_key: str
    amount: Decimal  # the most it may spend, in Jackpot's units
    force_manual_confirm: bool
    expires_at_s: float
    used: bool = False

    def ended(self) -> bool:
        return self.used or time.time() >= self.expires_at_s


class State(StrEnum):
    """Jackpot voucher states (the union of the two documented lists)."""

    RESERVED = "RESERVED"
    CONFIRMED = "CONFIRMED"
    READY = "READY"
    SENT = "SENT"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    REFUNDING = "REFUNDING"
    REFUNDED = "REFUNDED"
    REFUND_REJECTED = "REFUND_REJECTED"


# Plain strings: stored states are plain strings too, and may be ones this enum does not know.
_CONFIRMED_STATES = frozenset({State.CONFIRMED.value, State.READY.value, State.SENT.value})
# Fields that only exist once Jackpot confirmed or sent a voucher.
_AFTER_CONFIRM_FIELDS = ("confirmDate", "sendDate", "signedUrl")


@dataclass(frozen=True)
class NotifyAttempt:
    """One POST of a notification to the bridge, as Jackpot would log it."""

    voucher_id: str
    state: str
    attempt: int  # 1 for the first try of a `notify` call
    status: int  # 0 when there was no answer (connection error or timeout)
    error: str | None  # why there was no answer
    at_s: float  # when it was sent, epoch seconds


@dataclass(frozen=True)
class DeliverOutcome:
    """What `deliver` did: the final status of each notification it sent."""

    reserved_status: int
    ready_status: int | None  # None when READY was not sent (the voucher was not confirmed)
    state: str  # the voucher's state at the end


class JackpotSandbox:
    """The state of a Jackpot look-alike; `create_app(sandbox)` serves it over HTTP."""

    def __init__(
        self,
        api_key: str,
        link_secret: bytes | None = None,
        link_ttl_s: float = LINK_TTL_S,
        signed_url_shape: SignedUrlShape = "signedUrl",
        *,
        public_base_url: str | None = None,
        faults: Faults | None = None,
        notify_timeout_s: float = NOTIFY_ATTEMPT_TIMEOUT_S,
        api_signature: str | None = None,
        client_id: str | None = None,
        reserve_notification_url: str | None = None,
        token_field: TokenField = "access_token",
        session_ttl_s: float = SESSION_TTL_S,
        notify_attempts: int = AUTO_NOTIFY_ATTEMPTS,
        catalogue: dict[str, Store] | None = None,
    ) -> None:
        self.api_key = api_key
        # The back office's "Api Signature" (signs session JWTs) and the client id they go with.
        self.api_signature = api_signature if api_signature is not None else secrets.token_hex(32)
        self.client_id = client_id if client_id is not None else "bridge-sandbox"
        # Where vouchers reserved through a session are notified (the back office's setting).
        self.reserve_notification_url = reserve_notification_url
        self.token_field: TokenField = token_field
        self.session_ttl_s = session_ttl_s
        self.notify_attempts = notify_attempts
        self.catalogue = catalogue if catalogue is not None else default_catalogue()
        self.sessions: dict[str, Session] = {}
        self.used_assertions: set[str] = set()
        self.token_calls = 0
        self.reserve_calls = 0
        # Vouchers reserved through a session: whether each waits for PUT .../confirm.
        self._manual_confirm: dict[str, bool] = {}
        self._offer_of: dict[str, Offer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.link_secret = link_secret if link_secret is not None else secrets.token_bytes(32)
        self.link_ttl_s = link_ttl_s
        self.signed_url_shape: SignedUrlShape = signed_url_shape
        # Where this sandbox is reachable (`http://127.0.0.1:PORT`); PDF links point there.
        self.public_base_url = public_base_url
        self.faults = faults if faults is not None else Faults()
        self.notify_timeout_s = notify_timeout_s
        self.vouchers: dict[str, dict[str, Any]] = {}
        # Calls that passed the apikey check, per voucher id (faulted calls are in faults.calls).
        self.confirm_calls: collections.Counter[str] = collections.Counter()
        self.cancel_calls: collections.Counter[str] = collections.Counter()
        self.signedurl_calls: collections.Counter[str] = collections.Counter()
        # Vouchers whose PDF is not made yet: their signedurl answers 409 VOUCHER_NOT_READY.
        self.pdf_not_ready: set[str] = set()
        self.pdf_downloads: collections.Counter[str] = collections.Counter()
        self.deliveries: list[NotifyAttempt] = []
        self._targets: dict[str, tuple[str, str]] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._pdfs: dict[str, bytes] = {}
        self._session: aiohttp.ClientSession | None = None

    # Vouchers

    def reserve(
        self,
        *,
        notification_url: str,
        notification_key: str,
        value: int | Decimal = 110,
        price: int | Decimal = 150,
        coupon_id: str | None = None,
        validity_date: datetime | str | None = None,
        voucher_id: UUID | str | None = None,
    ) -> dict[str, Any]:
        """Create a RESERVED voucher whose notifications go to `notification_url?notificationKey=`.

        Returns a copy of the voucher JSON.
        """
        vid = str(voucher_id if voucher_id is not None else uuid4())
        if vid in self.vouchers:
            raise ValueError(f"voucher {vid} already exists")
        now = utcnow()
        if validity_date is None:
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
            validity = iso_z(midnight + VALIDITY)
        elif isinstance(validity_date, datetime):
            validity = iso_z(validity_date)
        else:
            validity = validity_date
        voucher: dict[str, Any] = {
            "id": vid,
            "state": State.RESERVED.value,
            "value": _json_number(value),
            "price": _json_number(price),
            "reservationDate": iso_z(now),
            "validityDate": validity,
            "resaExpireDate": iso_z(now + RESERVATION_TTL),
            "couponId": coupon_id if coupon_id is not None else _random_coupon_id(),
        }
        self.vouchers[vid] = voucher
        self._targets[vid] = (notification_url, notification_key)
        return dict(voucher)

    def set_state(self, voucher_id: UUID | str, state: str) -> None:
        """Put a voucher in `state` (any string); confirmed states get their confirm/send dates."""
        vid = str(voucher_id)
        voucher = self.vouchers[vid]
        voucher["state"] = str(state)
        now = iso_z(utcnow())
        if state in _CONFIRMED_STATES:
            voucher.setdefault("confirmDate", now)
        if state in (State.READY, State.SENT):
            voucher.setdefault("sendDate", now)
        waiter = self._waiters.pop(vid, None)
        if waiter is not None:
            waiter.set()

    async def wait_for_state(
        self, voucher_id: UUID | str, *states: str, timeout_s: float = CONFIRM_WAIT_S
    ) -> str:
        """Wait until the voucher is in one of `states`; returns it, or raises TimeoutError."""
        wanted = {str(state) for state in states}
        return await self._wait_until(str(voucher_id), lambda state: state in wanted, timeout_s)

    async def _wait_until(
        self, vid: str, predicate: Callable[[str], bool], timeout_s: float
    ) -> str:
        async with asyncio.timeout(timeout_s):
            while not predicate(state := str(self.vouchers[vid]["state"])):
                await self._waiters.setdefault(vid, asyncio.Event()).wait()
        return state

    def expire_if_due(self, voucher_id: str) -> None:
        """A reservation never confirmed becomes EXPIRED at its resaExpireDate, as at Jackpot."""
        voucher = self.vouchers.get(voucher_id)
        if voucher is None or voucher["state"] != State.RESERVED:
            return
        if parse_iso(voucher["resaExpireDate"]) <= utcnow():
            self.set_state(voucher_id, State.EXPIRED)

    # Signed links and PDFs

    def link_signature(self, voucher_id: UUID | str, expires: int) -> str:
        """Hex HMAC-SHA256 of `"{id}:{expires}"` under the link secret."""
        message = f"{voucher_id}:{expires}".encode()
        return hmac.new(self.link_secret, message, hashlib.sha256).hexdigest()

    def signed_url(self, voucher_id: UUID | str, *, expired: bool = False) -> str:
        """A link to the voucher's PDF on this sandbox, valid `link_ttl_s` (or already expired)."""
        if self.public_base_url is None:
            raise RuntimeError("the Jackpot sandbox has no public_base_url: start it first")
        now = time.time()
        expires = int(now) - EXPIRED_LINK_AGE_S if expired else math.ceil(now + self.link_ttl_s)
        query = f"expires={expires}&signature={self.link_signature(voucher_id, expires)}"
        return f"{self.public_base_url}/pdf/{voucher_id}.pdf?{query}"

    def pdf(self, voucher_id: str) -> bytes:
        """The voucher's PDF (made once, then the same bytes every time)."""
        pdf = self._pdfs.get(voucher_id)
        if pdf is None:
            pdf = self._pdfs[voucher_id] = voucher_pdf(self.vouchers[voucher_id])
        return pdf

    # Notifications

    def notification_url(self, voucher_id: UUID | str) -> str:
        """Where Jackpot posts this voucher's notifications: the URL with `?notificationKey=`."""
        url, key = self._targets[str(voucher_id)]
        return str(URL(url).update_query(notificationKey=key))

    def notification(
        self,
        voucher_id: UUID | str,
        state: str | None = None,
        *,
        expired_link: bool = False,
        signed_url: str | None = None,
    ) -> dict[str, Any]:
        """The JSON Jackpot would post for this voucher now, in its state or in `state`.

        A READY notification carries `signedUrl` (fresh, already expired, or the one given),
        `confirmDate` and `sendDate`; a RESERVED one only the reservation's fields.
        """
        payload = dict(self.vouchers[str(voucher_id)])
        if state is not None:
            payload["state"] = str(state)
        now = iso_z(utcnow())
        if payload["state"] == State.RESERVED:
            for name in _AFTER_CONFIRM_FIELDS:
                payload.pop(name, None)
        elif payload["state"] == State.READY:
            payload["signedUrl"] = (
                signed_url
                if signed_url is not None
                else self.signed_url(voucher_id, expired=expired_link)
            )
            payload.setdefault("confirmDate", now)
            payload.setdefault("sendDate", now)
        elif signed_url is not None:
            payload["signedUrl"] = signed_url
        return payload

    async def notify(
        self,
        voucher_id: UUID | str,
        state: str | None = None,
        *,
        expired_link: bool = False,
        signed_url: str | None = None,
        extra: dict[str, Any] | None = None,
        retry_window_s: float = NOTIFY_RETRY_WINDOW_S,
        max_attempts: int | None = None,
    ) -> int:
        """POST the voucher's notification to the bridge, retrying like Jackpot until a 200.

        Any other answer, a connection error or a timeout is retried with jittered exponential
        backoff (0.2 s doubling to 5 s) until `retry_window_s` has passed (or `max_attempts`
        were made). `extra` fields are
        merged into the payload last. The stored state is not changed (`set_state` does that).
        Returns the status of the last attempt, 0 if it got no answer; every attempt is
        appended to `deliveries`.
        """
        vid = str(voucher_id)
        payload = self.notification(vid, state, expired_link=expired_link, signed_url=signed_url)
        if extra:
            payload.update(extra)
        target = self.notification_url(vid)
        body = json.dumps(payload).encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_window_s
        backoff_s = NOTIFY_FIRST_BACKOFF_S
        attempt = 0
        while True:
            attempt += 1
            status, error = await self._post(target, body)
            self.deliveries.append(
                NotifyAttempt(vid, str(payload.get("state")), attempt, status, error, time.time())
            )
            remaining_s = deadline - loop.time()
            if status == 200 or remaining_s <= 0:
                return status
            if max_attempts is not None and attempt >= max_attempts:
                return status
            await asyncio.sleep(min(random.uniform(backoff_s / 2, backoff_s), remaining_s))
            backoff_s = min(backoff_s * 2, NOTIFY_MAX_BACKOFF_S)

    async def deliver(
        self,
        voucher_id: UUID | str,
        *,
        force: bool = False,
        confirm_timeout_s: float = CONFIRM_WAIT_S,
        expired_link: bool = False,
        signed_url: str | None = None,
        extra: dict[str, Any] | None = None,
        retry_window_s: float = NOTIFY_RETRY_WINDOW_S,
    ) -> DeliverOutcome:
        """Play a voucher's life as Jackpot would: notify RESERVED, then READY once confirmed.

        After a 200 to RESERVED, waits up to `confirm_timeout_s` for the bridge to confirm (or
        cancel); a CONFIRMED voucher becomes READY and is notified. With `force`, READY is set
        and notified whatever happened (the `notification` confirm mode, or odd sequences).
        """
        vid = str(voucher_id)
        reserved_status = await self.notify(
            vid, State.RESERVED, extra=extra, retry_window_s=retry_window_s
        )
        if not force:
            state = self.vouchers[vid]["state"]
            if reserved_status != 200:
                return DeliverOutcome(reserved_status, None, state)
            try:
                state = await self._wait_until(vid, _is_not_reserved, confirm_timeout_s)
            except TimeoutError:
                return DeliverOutcome(reserved_status, None, self.vouchers[vid]["state"])
            if state not in (State.CONFIRMED, State.READY):
                return DeliverOutcome(reserved_status, None, state)
        self.set_state(vid, State.READY)
        ready_status = await self.notify(
            vid,
            expired_link=expired_link,
            signed_url=signed_url,
            extra=extra,
            retry_window_s=retry_window_s,
        )
        return DeliverOutcome(reserved_status, ready_status, self.vouchers[vid]["state"])

    async def _post(self, target: str, body: bytes) -> tuple[int, str | None]:
        if self._session is None or self._session.closed:
            # A fresh connection per attempt, so a stale keep-alive socket never fakes a failure.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        timeout = aiohttp.ClientTimeout(total=self.notify_timeout_s)
        try:
            async with self._session.post(
                target, data=body, headers={"Content-Type": "application/json"}, timeout=timeout
            ) as response:
                await response.read()
                return response.status, None
        except (aiohttp.ClientError, TimeoutError) as error:
            return 0, f"{type(error).__name__}: {error}"

    # Sessions and reservations

    def open_session(self, client_id: object, assertion: object) -> tuple[int, dict[str, Any]]:
        """Check a token request (status, answer): a JWT signed by us, never exchanged before."""
        if client_id != self.client_id:
            return 401, {"error": "invalid_client", "error_description": "Unknown client_id"}
        if not isinstance(assertion, str) or not assertion:
            return 400, {"error": "invalid_request", "error_description": "assertion is missing"}
        digest = hashlib.sha256(assertion.encode()).hexdigest()
        if digest in self.used_assertions:
            return 400, {"error": "invalid_grant", "error_description": "assertion already used"}
        try:
            # The caller's key length is its business: PyJWT's warning must not be a 500 here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                claims = jwt.decode(
                    assertion,
                    self.api_signature,
                    algorithms=["HS256"],
                    options={"require": ["iat", "amount", "notificationKey"], "verify_iat": False},
                )
        except jwt.PyJWTError as error:
            return 400, {"error": "invalid_grant", "error_description": f"assertion: {error}"}
        problem = _claims_problem(claims)
        if problem is not None:
            return 400, {"error": "invalid_grant", "error_description": problem}
        self.used_assertions.add(digest)
        token = secrets.token_urlsafe(24)
        self.sessions[token] = Session(
            token=token,
            notification_key=claims["notificationKey"],
            amount=Decimal(str(claims["amount"])),
            force_manual_confirm=claims.get("forceManualConfirm") is True,
            expires_at_s=time.time() + self.session_ttl_s,
        )
        return 200, {
            self.token_field: token,
            "token_type": "Bearer",
            "expires_in": int(self.session_ttl_s),
        }

    def session_of(self, authorization: str | None) -> Session | None:
        """The live session a `Bearer` header names, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        session = self.sessions.get(token.strip())
        return None if session is None or session.ended() else session

    def reserve_with(
        self, session: Session, offer: Offer, value: Decimal, price: Decimal
    ) -> dict[str, Any]:
        """Reserve through `session` (which then ends) and start notifying as Jackpot does."""
        offer.stock -= 1
        session.used = True
        voucher = self.reserve(
            notification_url=self.reserve_notification_url or "",
            notification_key=session.notification_key,
            value=value,
            price=price,
        )
        vid = voucher["id"]
        self._manual_confirm[vid] = session.force_manual_confirm
        self._offer_of[vid] = offer
        self._spawn(self._after_reserve(vid))
        return voucher

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify_bounded(self, vid: str, state: str) -> int:
        if not self.reserve_notification_url:
            return 0
        return await self.notify(
            vid, state, retry_window_s=AUTO_NOTIFY_WINDOW_S, max_attempts=self.notify_attempts
        )

    async def _after_reserve(self, vid: str) -> None:
        status = await self._notify_bounded(vid, State.RESERVED)
        manual = self._manual_confirm.get(vid, True)
        if not manual and status == 200 and self.vouchers[vid]["state"] == State.RESERVED:
            # Without forceManualConfirm, the 200 to RESERVED is the agreement.
            self.set_state(vid, State.CONFIRMED)
            await self._ready(vid)

    async def _ready(self, vid: str) -> None:
        self.set_state(vid, State.READY)
        await self._notify_bounded(vid, State.READY)

    def confirmed(self, vid: str) -> None:
        """A session-reserved voucher was confirmed by the API: it becomes READY, notified."""
        if vid in self._manual_confirm:
            self._spawn(self._ready(vid))

    def canceled(self, vid: str) -> None:
        """A session-reserved voucher was cancelled: its offer has it in stock again."""
        offer = self._offer_of.pop(vid, None)
        if offer is not None:
            offer.stock += 1

    async def settle(self) -> None:
        """Wait for every notification this sandbox started on its own (tests use it)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop notifying and close the HTTP client used for notifications."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


JACKPOT = web.AppKey("jackpot", JackpotSandbox)


def create_app(sandbox: JackpotSandbox) -> web.Application:
    """The aiohttp application serving `sandbox`."""
    app = web.Application()
    app[JACKPOT] = sandbox
    app.router.add_put("/v2/voucher/{voucher_id}/confirm", _confirm)
    app.router.add_put("/v2/voucher/{voucher_id}/cancel", _cancel)
    app.router.add_get("/v2/vouchers/{voucher_id}/signedurl", _signedurl)
    app.router.add_get("/pdf/{voucher_id}.pdf", _pdf)
    app.router.add_post("/v2/token", _token)
    app.router.add_get("/v2/stores", _stores)
    app.router.add_get("/v2/stores/proposed-vouchers", _proposed)
    app.router.add_get("/v2/stores/{store_id}/proposed-vouchers", _proposed)
    app.router.add_get("/v2/stores/{store_id}/offers/{offer_id}", _offer)
    reserve = "/v2/stores/{store_id}/offers/{offer_id}/reserve-voucher-by-"
    app.router.add_post(reserve + "value", _reserve_by_value)
    app.router.add_post(reserve + "price", _reserve_by_price)
    app.on_cleanup.append(_close_client)
    return app


async def _close_client(app: web.Application) -> None:
    await app[JACKPOT].aclose()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def _not_found(voucher_id: str) -> web.Response:
    return _error(404, "VOUCHER_NOT_FOUND", f"Voucher {voucher_id} not found")


def _unauthorized(request: web.Request, sandbox: JackpotSandbox) -> web.Response | None:
    given = request.headers.get("apikey", "")
    if hmac.compare_digest(given.encode(), sandbox.api_key.encode()):
        return None
    return _error(401, "UNAUTHORIZED", "Missing or invalid apikey")


async def _confirm(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_CONFIRM, request)) is not None:
        return fault
    if (denied := _unauthorized(request, sandbox)) is not None:
        return denied
    vid = request.match_info["voucher_id"]
    sandbox.confirm_calls[vid] += 1
    sandbox.expire_if_due(vid)
    voucher = sandbox.vouchers.get(vid)
    if voucher is None:
        return _not_found(vid)
    if voucher["state"] == State.RESERVED:
        sandbox.set_state(vid, State.CONFIRMED)
        sandbox.confirmed(vid)
        return web.json_response(voucher)
    if voucher["state"] in _CONFIRMED_STATES:
        return _error(409, "VOUCHER_ALREADY_CONFIRMED", "Voucher already confirmed")
    return _error(409, "VOUCHER_NOT_CONFIRMABLE", f"Voucher is {voucher['state']}")


async def _cancel(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_CANCEL, request)) is not None:
        return fault
    if (denied := _unauthorized(request, sandbox)) is not None:
        return denied
    vid = request.match_info["voucher_id"]
    sandbox.cancel_calls[vid] += 1
    sandbox.expire_if_due(vid)
    voucher = sandbox.vouchers.get(vid)
    if voucher is None:
        return _not_found(vid)
    if voucher["state"] == State.RESERVED:
        sandbox.set_state(vid, State.CANCELED)
        sandbox.canceled(vid)
    if voucher["state"] == State.CANCELED:
        return web.json_response(voucher)
    return _error(409, "VOUCHER_NOT_CANCELABLE", f"Voucher is {voucher['state']}")


async def _signedurl(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_SIGNEDURL, request)) is not None:
        return fault
    if (denied := _unauthorized(request, sandbox)) is not None:
        return denied
    vid = request.match_info["voucher_id"]
    sandbox.signedurl_calls[vid] += 1
    if vid not in sandbox.vouchers:
        return _not_found(vid)
    if vid in sandbox.pdf_not_ready:
        # A voucher whose PDF Jackpot has not made yet: no link, so not READY.
        return _error(409, "VOUCHER_NOT_READY", f"Voucher is {sandbox.vouchers[vid]['state']}")
    url = sandbox.signed_url(vid)
    if sandbox.signed_url_shape == "bare":
        return web.json_response(url)
    return web.json_response({sandbox.signed_url_shape: url})


def _access_denied(message: str) -> web.Response:
    return _s3_error(403, "AccessDenied", message)


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


async def _pdf(request: web.Request) -> web.StreamResponse:
    """The storage behind signed links: checks like S3's, expiry first, then the signature."""
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_PDF, request)) is not None:
        return fault
    vid = request.match_info["voucher_id"]
    expires_text = request.query.get("expires")
    signature = request.query.get("signature")
    if not expires_text or not signature:
        return _access_denied("Query-string authentication requires the expires and signature")
    try:
        expires = int(expires_text)
    except ValueError:
        return _access_denied("Request signature does not match")
    if time.time() > expires:
        return _access_denied("Request has expired")
    expected = sandbox.link_signature(vid, expires)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return _access_denied("Request signature does not match")
    if vid not in sandbox.vouchers:
        return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
    body = sandbox.pdf(vid)
    sandbox.pdf_downloads[vid] += 1
    return web.Response(body=body, content_type="application/pdf")


async def _token(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_TOKEN, request)) is not None:
        return fault
    sandbox.token_calls += 1
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return web.json_response(
            {"error": "invalid_request", "error_description": "body must be a JSON object"},
            status=400,
        )
    if body.get("grant_type") != JWT_BEARER_GRANT:
        return web.json_response(
            {"error": "unsupported_grant_type", "error_description": f"use {JWT_BEARER_GRANT}"},
            status=400,
        )
    status, answer = sandbox.open_session(body.get("client_id"), body.get("assertion"))
    return web.json_response(answer, status=status)


def _catalogue_denied(request: web.Request, sandbox: JackpotSandbox) -> web.Response | None:
    """The catalogue takes an apikey or a live session (which route wants which is unknown)."""
    if sandbox.session_of(request.headers.get("Authorization")) is not None:
        return None
    return _unauthorized(request, sandbox)


async def _stores(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_CATALOGUE, request)) is not None:
        return fault
    if (denied := _catalogue_denied(request, sandbox)) is not None:
        return denied
    return web.json_response([store.as_json() for store in sandbox.catalogue.values()])


async def _proposed(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_CATALOGUE, request)) is not None:
        return fault
    if (denied := _catalogue_denied(request, sandbox)) is not None:
        return denied
    store_id = request.match_info.get("store_id")
    if store_id is not None and store_id not in sandbox.catalogue:
        return _error(404, "STORE_NOT_FOUND", f"Store {store_id} not found")
    stores = [sandbox.catalogue[store_id]] if store_id else list(sandbox.catalogue.values())
    return web.json_response([o.as_json() for store in stores for o in store.offers.values()])


def _find_offer(sandbox: JackpotSandbox, request: web.Request) -> Offer | web.Response:
    store_id, offer_id = request.match_info["store_id"], request.match_info["offer_id"]
    store = sandbox.catalogue.get(store_id)
    if store is None:
        return _error(404, "STORE_NOT_FOUND", f"Store {store_id} not found")
    offer = store.offers.get(offer_id)
    if offer is None:
        return _error(404, "OFFER_NOT_FOUND", f"Offer {offer_id} not found in store {store_id}")
    return offer


async def _offer(request: web.Request) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_CATALOGUE, request)) is not None:
        return fault
    if (denied := _catalogue_denied(request, sandbox)) is not None:
        return denied
    offer = _find_offer(sandbox, request)
    return offer if isinstance(offer, web.Response) else web.json_response(offer.as_json())


async def _reserve_by_value(request: web.Request) -> web.StreamResponse:
    return await _reserve_route(request, "value")


async def _reserve_by_price(request: web.Request) -> web.StreamResponse:
    return await _reserve_route(request, "price")


async def _reserve_route(request: web.Request, by: Literal["value", "price"]) -> web.StreamResponse:
    sandbox = request.app[JACKPOT]
    if (fault := await sandbox.faults.apply(FaultRoute.JACKPOT_RESERVE, request)) is not None:
        return fault
    sandbox.reserve_calls += 1
    session = sandbox.session_of(request.headers.get("Authorization"))
    if session is None:
        return _error(401, "UNAUTHORIZED", "Missing, expired or used session token")
    offer = _find_offer(sandbox, request)
    if isinstance(offer, web.Response):
        return offer
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    amount = body.get(by) if isinstance(body, dict) else None
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not amount > 0:
        return _error(400, "INVALID_BODY", f'body must be {{"{by}": <a positive number>}}')
    given = Decimal(str(amount))
    quote = offer.by_value(given) if by == "value" else offer.by_price(given)
    if quote is None:
        return _error(
            400,
            "AMOUNT_NOT_ALLOWED",
            f"{by} {amount} is not offered: values {offer.min_value} to {offer.max_value}",
        )
    value, price = quote
    if price > session.amount:
        return _error(400, "AMOUNT_EXCEEDS_SESSION", f"price {price} is over the session amount")
    if offer.stock <= 0:
        return _error(409, "OUT_OF_STOCK", f"Offer {offer.id} is out of stock")
    return web.json_response(sandbox.reserve_with(session, offer, value, price))


def _claims_problem(claims: dict[str, Any]) -> str | None:
    iat = claims["iat"]
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        return "iat must be a number of seconds"
    age_s = time.time() - iat
    if age_s > MAX_ASSERTION_AGE_S:
        return "assertion expired"
    if -age_s > MAX_ASSERTION_SKEW_S:
        return "assertion issued in the future"
    amount = claims["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not amount > 0:
        return "amount must be a positive number"
    key = claims["notificationKey"]
    if not isinstance(key, str) or not key:
        return "notificationKey must be a non-empty string"
    return None


def _is_not_reserved(state: str) -> bool:
    return state != State.RESERVED


def _json_number(value: int | Decimal) -> int | float:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _random_coupon_id() -> str:
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(COUPON_ID_CHARS))


def _pdf_text(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return "".join(char if 32 <= ord(char) < 127 else "?" for char in escaped)


# A bar per bit of the coupon's SHA-256: the page looks like a voucher with a barcode, and the
# file weighs a few KB like a real one.
_BAR_WIDTH_PT = 1.5


def voucher_pdf(voucher: dict[str, Any]) -> bytes:
    """A small, valid one-page PDF 1.4 showing the voucher's coupon id, value and validity."""
    coupon = _pdf_text(str(voucher.get("couponId", "")))
    value = _pdf_text(str(voucher.get("value")))
    validity = _pdf_text(str(voucher.get("validityDate")))
    lines = [
        "BT /F1 28 Tf 72 760 Td (Jackpot gift voucher) Tj ET",
        f"BT /F1 18 Tf 72 720 Td (Coupon: {coupon}) Tj ET",
        f"BT /F1 14 Tf 72 696 Td (Value: {value}) Tj ET",
        f"BT /F1 14 Tf 72 676 Td (Valid until: {validity}) Tj ET",
        f"BT /F1 10 Tf 72 656 Td (Voucher id: {_pdf_text(str(voucher.get('id')))}) Tj ET",
    ]
    digest = hashlib.sha256(coupon.encode()).digest()
    bits = [(byte >> shift) & 1 for byte in digest for shift in range(8)]
    for index, bit in enumerate(bits):
        x = 72 + index * _BAR_WIDTH_PT * 1.2
        height = 60 if bit else 40
        lines.append(f"{x:.1f} 560 {_BAR_WIDTH_PT:.1f} {height} re f")
    lines.append(f"BT /F1 12 Tf 72 530 Td ({coupon}) Tj ET")
    content = "\n".join(lines).encode("ascii")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_at,
    )
    return bytes(out)
