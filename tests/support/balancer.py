"""A round-robin HTTP balancer on loopback: what a load balancer in front of ingress replicas does.

Each request goes to the next backend in turn; a backend that refuses the connection (its
process is gone) is skipped for the next one, as a proxy's "next upstream on connect error"
does. A failure after the request was sent is answered 502 and not retried: a POST that may
have been stored is the caller's to retry, never the balancer's.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from shared.service import start_site

# Longer than an ingress's longest answer (a confirm wait, or a spool fsync under load).
FORWARD_TIMEOUT_S = 15.0


class Balancer:
    """`async with Balancer([url, ...]) as url:` serves on a free loopback port."""

    def __init__(self, backends: Sequence[str]) -> None:
        self.backends = list(backends)
        self.forwarded: collections.Counter[str] = collections.Counter()  # answered, per backend
        self.skipped: collections.Counter[str] = collections.Counter()  # refused the connection
        self._turn = itertools.cycle(range(len(self.backends)))
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> str:
        # A fresh connection per request, so a dead backend shows at connect, not mid-request.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S),
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner, port = await start_site(app, "127.0.0.1", 0, shutdown_timeout_s=1)
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        for _ in self.backends:
            backend = self.backends[next(self._turn)]
            try:
                async with self._session.request(
                    request.method, backend + request.path_qs, data=body, headers=headers
                ) as answer:
                    data = await answer.read()
                    self.forwarded[backend] += 1
                    return web.Response(
                        status=answer.status,
                        body=data,
                        headers={"Content-Type": answer.content_type},
                    )
            except aiohttp.ClientConnectorError:
                self.skipped[backend] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                return web.json_response(
                    {"error": "bad_gateway", "detail": f"{backend}: {error}"}, status=502
                )
        return web.json_response(
            {"error": "bad_gateway", "detail": "no backend accepted the connection"}, status=502
        )
