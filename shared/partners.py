"""HTTP clients for Jackpot and Doshii: each call's answer mapped to success or a named error."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import jwt
import orjson
from pydantic import ValidationError

from shared import reserve
from shared.errors import PermanentError, TransientError
from shared.models import Voucher
from shared.reserve import JackpotRefusal, RefusalKind
from shared.settings import ConfirmMode, JackpotOffer, ReserveBy, Settings, check_intake

# Error bodies are quoted into reasons and logs; a few hundred characters say enough.
ERROR_BODY_CHARS = 300


class PartnerRefused(PermanentError):
    """A 4xx answer; the status and body tell the caller whether it can be explained."""

    def __init__(self, partner: str, action: str, status: int, body: str) -> None:
        super().__init__(f"{partner} {action}: HTTP {status}: {body[:ERROR_BODY_CHARS]}")
        self.status = status
        self.body = body


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


@asynccontextmanager
async def call(
    session: aiohttp.ClientSession, partner: str, action: str, method: str, url: str, **kw: Any
) -> AsyncIterator[aiohttp.ClientResponse]:
    """Make one partner call; 429, 5xx, timeouts and lost connections become TransientError."""
    try:
        async with session.request(method, url, **kw) as response:
            if response.status == 429 or response.status >= 500:
                raise TransientError(
                    f"{partner} {action}: HTTP {response.status}",
                    retry_after_s=retry_after_s(response.headers.get("Retry-After")),
                )
            yield response
    except (TimeoutError, aiohttp.ClientError) as error:
        raise TransientError(f"{partner} {action}: {type(error).__name__}: {error}") from error


async def _refuse(partner: str, action: str, response: aiohttp.ClientResponse) -> PartnerRefused:
    return PartnerRefused(partner, action, response.status, await response.text(errors="replace"))


class Jackpot:
    """Jackpot's voucher API (`apikey` header)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = {"apikey": api_key, "Accept": "application/json"}

    async def confirm(self, voucher_id: str) -> bool:
        """Confirm a reservation; True if this call confirmed it, False if it already was."""
        url = f"{self.base_url}/v2/voucher/{voucher_id}/confirm"
        async with call(self.session, "Jackpot", "confirm", "PUT", url, headers=self.headers) as r:
            if r.status in (200, 201, 204):
                return True
            text = await r.text(errors="replace")
            if r.status == 409 and "ALREADY_CONFIRMED" in text.upper().replace(" ", "_"):
                return False
            raise PartnerRefused("Jackpot", "confirm", r.status, text)

    async def cancel(self, voucher_id: str) -> None:
        url = f"{self.base_url}/v2/voucher/{voucher_id}/cancel"
        async with call(self.session, "Jackpot", "cancel", "PUT", url, headers=self.headers) as r:
            if r.status not in (200, 201, 204):
                raise await _refuse("Jackpot", "cancel", r)

    async def signed_url(self, voucher_id: str) -> str:
        """A fresh signed PDF link: `{"signedUrl": ...}`, `{"url": ...}` or a bare JSON string."""
        url = f"{self.base_url}/v2/vouchers/{voucher_id}/signedurl"
        async with call(
            self.session, "Jackpot", "signed url", "GET", url, headers=self.headers
        ) as r:
            if r.status != 200:
                raise await _refuse("Jackpot", "signed url", r)
            text = await r.text()
        try:
            data = json.loads(text)
        except ValueError:
            data = text.strip()
        if isinstance(data, dict):
            data = data.get("signedUrl") or data.get("url")
        if not isinstance(data, str) or not data.startswith(("http://", "https://")):
            raise PermanentError("Jackpot signed url: the answer holds no URL")
        return data


class SessionRefused(PermanentError):
    """`POST /v2/token` refused the signed JWT (4xx).

    `assertion_used` says Jackpot named it already exchanged: a JWT that was kept and sent again
    after a lost answer, so a session (and maybe a voucher) exists for it. Whatever Jackpot says,
    a refused JWT that was sent before leaves the reservation's outcome unknown.
    """

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"Jackpot token: HTTP {status}: {body[:ERROR_BODY_CHARS]}")
        self.status = status
        self.body = body
        self.assertion_used = reserve.assertion_was_used(body)


class SessionEnded(PermanentError):
    """The reserve call answered 401: the session is used up (one reservation) or expired.

    After a lost answer to an earlier reserve with the same token, that reservation may exist.
    """


class ReservationUnreadable(PermanentError):
    """Jackpot said yes (2xx) but the answer is no voucher: one may exist, unknown which."""


class JackpotSessions:
    """Jackpot's client-session API: a one-time JWT, exchanged for a session that reserves once.

    `assertion()` signs the JWT (keep it: sent again, it cannot open a second session);
    `open_session()` exchanges it at `POST /v2/token`; `reserve()` reserves with the session.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        client_id: str,
        api_signature: str,
        reserve_by: ReserveBy = ReserveBy.VALUE,
        confirm: ConfirmMode = ConfirmMode.API,
        value_to_cents: int = 100,
    ) -> None:
        self.session = session
        self.base_url = base_url
        self.client_id = client_id
        self._api_signature = api_signature
        self.reserve_by = reserve_by
        self.confirm = confirm
        self.value_to_cents = value_to_cents

    @classmethod
    def from_settings(cls, session: aiohttp.ClientSession, settings: Settings) -> JackpotSessions:
        """The client the settings describe; SettingsError names what the intake lacks."""
        check_intake(settings)
        assert settings.jackpot_api_signature is not None  # check_intake made sure
        assert settings.jackpot_client_id is not None
        return cls(
            session,
            settings.jackpot_api_url,
            client_id=settings.jackpot_client_id,
            api_signature=settings.jackpot_api_signature.get_secret_value(),
            reserve_by=settings.jackpot_reserve_by,
            confirm=settings.jackpot_confirm,
            value_to_cents=settings.value_to_cents,
        )

    def units(self, amount_cents: int) -> Decimal:
        """The amount in Jackpot's units; JackpotRefusal (amount not allowed) if not exact."""
        try:
            return reserve.cents_to_units(amount_cents, self.value_to_cents)
        except ValueError as error:
            raise JackpotRefusal(
                RefusalKind.AMOUNT_NOT_ALLOWED, amount_cents, 0, str(error)
            ) from error

    def assertion(
        self, *, amount_cents: int, notification_key: str, issued_at_s: int | None = None
    ) -> str:
        """The session JWT (HS256 with the API signature) for one sale's reservation."""
        claims = reserve.session_claims(
            amount_units=self.units(amount_cents),
            notification_key=notification_key,
            issued_at_s=int(time.time()) if issued_at_s is None else issued_at_s,
            force_manual_confirm=self.confirm == ConfirmMode.API,
        )
        return jwt.encode(claims, self._api_signature, algorithm="HS256")

    async def open_session(self, assertion: str) -> str:
        """Exchange the JWT for a session token; SessionRefused on a 4xx."""
        url = f"{self.base_url}/v2/token"
        body = reserve.token_request(self.client_id, assertion)
        headers = {"Accept": "application/json"}
        async with call(
            self.session, "Jackpot", "token", "POST", url, json=body, headers=headers
        ) as r:
            text = await r.text(errors="replace")
            if r.status not in (200, 201):
                raise SessionRefused(r.status, text)
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        token = reserve.token_from(answer)
        if token is None:
            raise PermanentError(
                "Jackpot token: the answer holds no access_token, accessToken or token"
            )
        return token

    async def reserve(self, token: str, *, offer: JackpotOffer, amount_cents: int) -> Voucher:
        """Reserve a voucher of `amount_cents` at `offer` with the session; the RESERVED voucher.

        JackpotRefusal (with the till's reason) on out of stock, no such offer, an amount not
        allowed or any other 4xx; SessionEnded on 401; TransientError on 5xx, 429, timeouts.
        """
        units = self.units(amount_cents)
        path = reserve.reserve_route(offer.store_id, offer.offer_id, self.reserve_by)
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        body = reserve.reserve_body(self.reserve_by, units)
        url = f"{self.base_url}{path}"
        async with call(
            self.session, "Jackpot", "reserve", "POST", url, json=body, headers=headers
        ) as r:
            text = await r.text(errors="replace")
            if r.status == 401:
                raise SessionEnded(f"Jackpot reserve: HTTP 401: {text[:ERROR_BODY_CHARS]}")
            if r.status not in (200, 201):
                kind = reserve.classify_refusal(r.status, text)
                raise JackpotRefusal(kind, amount_cents, r.status, text[:ERROR_BODY_CHARS])
        try:
            return Voucher.model_validate_json(text)
        except ValidationError as error:
            raise ReservationUnreadable(
                f"Jackpot reserve: HTTP {r.status} but the answer is not a voucher "
                f"({error.error_count()} problems)"
            ) from error


class Doshii:
    """Doshii's partner API: a fresh HS256 JWT per call and the location header."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, client_id: str, client_secret: str
    ) -> None:
        self.session = session
        self.base_url = base_url
        self.client_id = client_id
        self.client_secret = client_secret
        # PyJWT prepares and checks the key on every encode: about 0.1 ms a call here.
        self._token_second = -1
        self._token_value = ""

    def _token(self) -> str:
        """The JWT for this second: signing again within it would give the same bytes."""
        now_s = int(time.time())
        if now_s != self._token_second:
            self._token_value = jwt.encode(
                {"clientId": self.client_id, "timestamp": now_s},
                self.client_secret,
                algorithm="HS256",
            )
            self._token_second = now_s
        return self._token_value

    def _headers(self, location_id: str) -> Mapping[str, str]:
        return {
            "authorization": f"Bearer {self._token()}",
            "doshii-location-id": location_id,
            "content-type": "application/json",
        }

    def _url(self, request_id: str) -> str:
        return f"{self.base_url}/loyalty/cards/activation/{request_id}"

    async def get(self, location_id: str, request_id: str) -> dict[str, Any]:
        headers = self._headers(location_id)
        async with call(
            self.session, "Doshii", "get", "GET", self._url(request_id), headers=headers
        ) as r:
            if r.status != 200:
                raise await _refuse("Doshii", "get", r)
            text = await r.read()
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            raise PermanentError(f"Doshii get: the answer is not JSON: {error}") from error
        if not isinstance(data, dict):
            raise PermanentError("Doshii get: the answer is not an object")
        return data

    async def put(self, location_id: str, request_id: str, body: Mapping[str, object]) -> None:
        headers = self._headers(location_id)
        url = self._url(request_id)
        data = orjson.dumps(body)  # the content type is in the headers
        async with call(
            self.session, "Doshii", "update", "PUT", url, data=data, headers=headers
        ) as r:
            if r.status not in (200, 201, 204):
                raise await _refuse("Doshii", "update", r)
