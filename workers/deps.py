"""What the worker handlers are given: settings, names and partner clients, built once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from shared.ledger import Ledger
from shared.partners import Doshii, Jackpot
from shared.settings import Settings
from shared.topology import Names


@dataclass(frozen=True)
class Deps:
    settings: Settings
    names: Names
    jackpot: Jackpot
    doshii: Doshii
    # A session of its own for PDF downloads: no redirects followed, no cookies kept.
    downloads: aiohttp.ClientSession
    # The partners' session, for clients built by a stage itself (the intake's Jackpot).
    partners: aiohttp.ClientSession
    # Only the stages that need the ledger at once (the intake) have it.
    ledger: Ledger | None = None


@asynccontextmanager
async def open_deps(settings: Settings) -> AsyncIterator[Deps]:
    timeout = aiohttp.ClientTimeout(total=settings.partner_timeout_s)
    connector = aiohttp.TCPConnector(limit=256)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as partners,
        aiohttp.ClientSession(
            timeout=timeout, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True
        ) as downloads,
    ):
        yield Deps(
            settings=settings,
            names=Names(settings.namespace),
            jackpot=Jackpot(
                partners, settings.jackpot_api_url, settings.jackpot_api_key.get_secret_value()
            ),
            doshii=Doshii(
                partners,
                settings.doshii_api_url,
                settings.doshii_client_id,
                settings.doshii_client_secret.get_secret_value(),
            ),
            downloads=downloads,
            partners=partners,
        )
