"""Serving an application in tests the way `bridge` serves it."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.service import RUNNER


class RunnerTestServer(TestServer):
    """aiohttp's TestServer, but with the runner the app asks for (`shared.service.RUNNER`).

    The ingress hands its notification POST straight to the handler in its own runner; served
    by the plain AppRunner, tests would only ever see the routed path.
    """

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return self.app.get(RUNNER, web.AppRunner)(self.app, **kwargs)
