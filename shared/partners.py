"""HTTP clients for Jackpot and Doshii: each call's answer mapped to success or a named error."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import jwt

from shared.errors import PermanentError, TransientError

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
            data = await r.json(content_type=None)
        if not isinstance(data, dict):
            raise PermanentError("Doshii get: the answer is not an object")
        return data

    async def put(self, location_id: str, request_id: str, body: Mapping[str, object]) -> None:
        headers = self._headers(location_id)
        url = self._url(request_id)
        async with call(
            self.session, "Doshii", "update", "PUT", url, json=body, headers=headers
        ) as r:
            if r.status not in (200, 201, 204):
                raise await _refuse("Doshii", "update", r)
