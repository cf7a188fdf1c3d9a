"""Fault injection for the sandboxes: make a route fail, slow down or hang up, a number of times.

Every handler of both sandboxes calls `Faults.apply(route, request)` first; a non-None answer is
sent instead of the real one. `start_sandboxes` gives both sandboxes the same `Faults`, so one
registry (and one HTTP control route) drives them all; route names carry their sandbox.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus

from aiohttp import web

# The answer `apply` returns for a dropped call: the transport is already closed, so writing it
# fails quietly inside aiohttp and the client sees the connection end without any response.
_DROPPED_STATUS = 499


class FaultRoute(StrEnum):
    """The routes a fault can target."""

    JACKPOT_CONFIRM = "jackpot.confirm"
    JACKPOT_CANCEL = "jackpot.cancel"
    JACKPOT_SIGNEDURL = "jackpot.signedurl"
    JACKPOT_PDF = "jackpot.pdf"
    JACKPOT_TOKEN = "jackpot.token"
    JACKPOT_RESERVE = "jackpot.reserve"
    JACKPOT_CATALOGUE = "jackpot.catalogue"
    DOSHII_GET = "doshii.get"
    DOSHII_PUT = "doshii.put"


ROUTES = frozenset(route.value for route in FaultRoute)
UNTIL_CLEARED = -1


@dataclass
class Fault:
    """What a faulted call does instead of (or before) its real answer."""

    status: int | None = None  # answer this status (500, 503, 429...) instead of the real thing
    times: int = 1  # how many calls it applies to, then it is used up; -1 = until cleared
    retry_after_s: float | None = None  # Retry-After header: whole seconds, rounded up
    delay_s: float = 0.0  # sleep this long before answering (the fault, or the real answer)
    drop: bool = False  # close the connection without any answer

    def __post_init__(self) -> None:
        if self.status is not None and not 200 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP status")
        if self.times != UNTIL_CLEARED and self.times < 1:
            raise ValueError("times must be at least 1, or -1 for until cleared")
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError("retry_after_s must not be negative")
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")


def error_name(status: int) -> str:
    """`ServiceUnavailable` for 503: the `name` of a partner-style error body."""
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"


class Faults:
    """The faults set per route, and a count of every call each route received."""

    def __init__(self) -> None:
        self._faults: dict[str, Fault] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()

    def set(self, route: str, fault: Fault) -> None:
        """Make the next `fault.times` calls of `route` fail; replaces any fault already set."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {sorted(ROUTES)}")
        self._faults[route] = fault

    def clear(self, route: str | None = None) -> None:
        """Remove the fault of `route`, or of every route."""
        if route is None:
            self._faults.clear()
        else:
            self._faults.pop(route, None)

    def get(self, route: str) -> Fault | None:
        """The fault currently set on `route`, if any."""
        return self._faults.get(route)

    def _take(self, route: str) -> Fault | None:
        fault = self._faults.get(route)
        if fault is None:
            return None
        if fault.times != UNTIL_CLEARED:
            fault.times -= 1
            if fault.times <= 0:
                del self._faults[route]
        return fault

    async def apply(self, route: str, request: web.BaseRequest) -> web.StreamResponse | None:
        """Count the call; if a fault is set, carry it out and return the answer to send instead."""
        self.calls[route] += 1
        fault = self._take(route)
        if fault is None:
            return None
        self.injected[route] += 1
        if fault.delay_s > 0:
            await asyncio.sleep(fault.delay_s)
        if fault.drop:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=_DROPPED_STATUS)
        if fault.status is None:
            return None
        headers = {}
        if fault.retry_after_s is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after_s))
        body = {
            "statusCode": fault.status,
            "name": error_name(fault.status),
            "message": "injected fault",
        }
        return web.json_response(body, status=fault.status, headers=headers)
