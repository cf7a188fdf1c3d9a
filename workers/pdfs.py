"""pdfs (`voucher.ready`): download the voucher PDF, renewing its link when expired, store it,
then activate the card at Doshii.

The activation is pushed from here rather than through the doshii queue: one hop less for
every voucher. A retried message finds its PDF stored and only pushes again.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog

from shared import envelope, journal
from shared.errors import PermanentError, TransientError
from shared.journal import State
from shared.logs import redact_url
from shared.models import DoshiiStatus, DoshiiUpdate, Voucher, value_to_cents
from shared.partners import call
from shared.settings import PdfOrigin
from workers.deps import Deps
from workers.doshii import push
from workers.messages import voucher_of
from workers.runner import Handler, Incoming, Outcome

log = structlog.get_logger("pdfs")

# Jackpot's signed links live one hour; renew a little early rather than fail a download.
LINK_LIFETIME_S = 3600
LINK_MARGIN_S = 60
MAX_REDIRECTS = 3
PDF_MAGIC = b"%PDF-"
CHUNK_BYTES = 64 * 1024
# Statuses with which S3-like storage refuses an expired or revoked link.
REFUSED_LINK_STATUSES = frozenset({401, 403, 404, 410})


class LinkRefused(Exception):
    """The storage refused the link (expired, revoked): a fresh link may work."""


def check_origin(url: str, allowed: Sequence[PdfOrigin]) -> None:
    """Refuse any URL whose scheme, host and port are not an allowed origin."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise PermanentError(f"PDF link is not a URL: {redact_url(url)}") from error
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentError(f"PDF link has a forbidden scheme: {parts.scheme or 'none'}")
    if parts.username or parts.password:
        raise PermanentError("PDF link carries credentials")
    origin = (
        parts.scheme,
        parts.hostname.lower(),
        port or (443 if parts.scheme == "https" else 80),
    )
    if origin not in allowed:
        raise PermanentError(f"PDF host not allowed: {redact_url(url)}")


def link_expired(voucher: Voucher, received: datetime | None, now: datetime) -> bool:
    """Whether the READY link is past its hour: counted from when Jackpot sent it."""
    issued = voucher.sendDate or voucher.confirmDate or received
    if issued is None:
        return False
    return now - issued > timedelta(seconds=LINK_LIFETIME_S - LINK_MARGIN_S)


async def download(session: aiohttp.ClientSession, url: str, deps: Deps) -> bytes:
    """GET the PDF, following only redirects that stay on the allowlist, within the size cap."""
    allowed = deps.settings.pdf_hosts
    cap = deps.settings.pdf_max_bytes
    for _ in range(MAX_REDIRECTS + 1):
        check_origin(url, allowed)
        async with call(session, "PDF storage", "download", "GET", url, allow_redirects=False) as r:
            if r.status in (301, 302, 303, 307, 308):
                location = r.headers.get("Location")
                if not location:
                    raise PermanentError(f"PDF storage redirected without a Location ({r.status})")
                url = urljoin(url, location)
                continue
            if r.status in REFUSED_LINK_STATUSES or (
                r.status == 400 and "expire" in (await r.text(errors="replace")).lower()
            ):
                raise LinkRefused(f"PDF storage refused the link: HTTP {r.status}")
            if r.status != 200:
                raise PermanentError(f"PDF storage answered HTTP {r.status}")
            if r.content_length is not None and r.content_length > cap:
                raise PermanentError(f"PDF is {r.content_length} bytes, over the {cap} cap")
            data = bytearray()
            async for chunk in r.content.iter_chunked(CHUNK_BYTES):
                data += chunk
                if len(data) > cap:
                    raise PermanentError(f"PDF is over the {cap} bytes cap")
            if not data.startswith(PDF_MAGIC):
                raise PermanentError("download is not a PDF (no %PDF- header)")
            return bytes(data)
    raise PermanentError(f"PDF storage redirected more than {MAX_REDIRECTS} times")


def store(folder: Path, voucher_id: str, data: bytes) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename over."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{voucher_id}.pdf"
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{voucher_id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def stored(folder: Path, voucher_id: str) -> bool:
    path = folder / f"{voucher_id}.pdf"
    try:
        with path.open("rb") as handle:
            return handle.read(len(PDF_MAGIC)) == PDF_MAGIC
    except FileNotFoundError:
        return False


def renewed_step(message: Incoming, voucher: Voucher, why: str) -> journal.Step:
    return journal.step(
        voucher.id,
        message.message_id or f"{voucher.id}:READY",
        "pdfs",
        journal.Outcome.LINK_RENEWED,
        attempt=message.attempt,
        at_ms=message.started_ms or None,  # with the stage's own step, just before it
        detail=why,
    )


async def fetch_pdf(deps: Deps, message: Incoming, voucher: Voucher) -> bytes:
    voucher_id = str(voucher.id)
    url = voucher.signedUrl
    renewed = False
    if url is None or link_expired(
        voucher, envelope.received_at(message.headers), datetime.now(UTC)
    ):
        url = await deps.jackpot.signed_url(voucher_id)
        renewed = True
        why = "no link in the notification" if voucher.signedUrl is None else "link too old"
        message.steps.append(renewed_step(message, voucher, why))
    try:
        return await download(deps.downloads, url, deps)
    except LinkRefused:
        if renewed:
            raise TransientError("PDF storage refused a freshly signed link") from None
    log.info("link_renewed", reason="refused")
    url = await deps.jackpot.signed_url(voucher_id)
    message.steps.append(renewed_step(message, voucher, "PDF storage refused the link"))
    try:
        return await download(deps.downloads, url, deps)
    except LinkRefused as error:
        raise TransientError(f"PDF storage refused a freshly signed link: {error}") from error


def make_handler(deps: Deps) -> Handler:
    settings = deps.settings

    async def handle(message: Incoming) -> Outcome:
        voucher, claims = voucher_of(message)
        voucher_id = str(voucher.id)
        cents = value_to_cents(voucher.value, settings.value_to_cents)
        if cents != claims.amount_cents:
            raise PermanentError(
                f"READY voucher {voucher.couponId} is worth {cents} cents, the request asked for "
                f"{claims.amount_cents}: resolve by hand"
            )
        # A local stat and a 5-byte read: cheaper inline than a hop to a thread.
        path = settings.pdf_dir / f"{voucher_id}.pdf"
        if stored(settings.pdf_dir, voucher_id):
            detail = "PDF already stored"
            size = path.stat().st_size
        else:
            data = await fetch_pdf(deps, message, voucher)
            # The fsync can take milliseconds on a busy disk: keep it off the event loop.
            path = await asyncio.to_thread(store, settings.pdf_dir, voucher_id, data)
            size = len(data)
            detail = f"PDF stored: {path} ({size} bytes)"
        pdf_facts = {"pdf_path": str(path), "pdf_bytes": size}
        message.steps.append(
            journal.step(
                voucher.id,
                message.message_id or f"{voucher_id}:READY",
                str(message.stage),
                journal.Outcome.PDF_STORED,
                request_id=claims.request_id,
                attempt=message.attempt,
                at_ms=message.started_ms or None,  # before the stage's own step, the activation
                detail=detail,
                state=State.PDF_STORED,
                facts=pdf_facts,
            )
        )
        update = DoshiiUpdate(
            location_id=claims.location_id,
            request_id=claims.request_id,
            voucher_id=voucher.id,
            coupon_id=voucher.couponId,
            status=DoshiiStatus.ACTIVATED,
            amount_cents=cents,
            expiry_date=voucher.validityDate,
            reference=voucher.couponId,
        )
        activated = await push(deps, update, message.headers)
        return replace(
            activated,
            detail=f"{detail}; Doshii {activated.detail}",
            facts={**pdf_facts, **activated.facts},
        )

    return handle
