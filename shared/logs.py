"""Logging: structlog configured once, JSON when stderr is not a terminal.

Every event uses the same keys (`voucher_id`, `coupon_id`, `doshii_request_id`, `stage`,
`attempt`, `outcome`, `duration_ms`). Secrets, keys and signed-link query strings are never
passed to a logger; `redact_url` strips a URL down to what is safe to show.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def _dumps(event: Any, **_: Any) -> str:
    # orjson: the per-notification log line is on the ingress's hot path.
    return orjson.dumps(event, default=repr).decode()


def configure(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    cache: bool = True,
) -> None:
    """Configure structlog for the process; `json=None` picks JSON unless the stream is a TTY.

    `cache=False` lets a later call take effect for loggers already used (tests do that).
    """
    stream = stream or sys.stderr
    as_json = (not stream.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
    # Libraries log through the standard library; keep their warnings, in the same stream.
    logging.basicConfig(stream=stream, level=logging.WARNING, format="%(name)s %(message)s")
    # aiohttp's access log line holds the query string, which carries the notificationKey.
    logging.getLogger("aiohttp.access").disabled = True


def redact_url(url: str | None) -> str | None:
    """The URL without its query string or credentials: safe to log for a signed link."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
