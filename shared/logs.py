"""Logging: structlog configured once, JSON when stderr is not a terminal.

Every event uses the same keys (`voucher_id`, `coupon_id`, `doshii_request_id`, `stage`,
`attempt`, `outcome`, `duration_ms`). Secrets, keys and signed-link query strings are never
passed to a logger; `redact_url` strips a URL down to what is safe to show.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def _dumps(event: Any, **_: Any) -> str:
    # orjson: the per-notification log line is on the ingress's hot path.
    return orjson.dumps(event, default=repr).decode()


class IsoTimestamp:
    """Adds `timestamp` (ISO 8601, UTC, microseconds), formatting the date once per second.

    structlog's TimeStamper formats a datetime on every event: about 5 us per line here.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


class LoopBatchedWriter:
    """A structlog logger that writes the lines of one event-loop turn in one system call.

    structlog's WriteLogger writes and flushes every line: on the ingress that was about
    40 us per notification. Lines logged outside a running loop are written at once, and
    whatever is pending is written at exit.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled = False
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        self._pending.append(message)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not take the service down


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
    writer = LoopBatchedWriter(stream)
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
            IsoTimestamp(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=cache,
    )
    # Libraries (aiormq, aiohttp) log through the standard library; keep their warnings, in the
    # same stream and the same shape, so a JSON log collector never meets a bare traceback.
    logging.basicConfig(level=logging.WARNING, handlers=[library_handler(stream, renderer)])
    # aiohttp's access log line holds the query string, which carries the notificationKey.
    logging.getLogger("aiohttp.access").disabled = True


def library_handler(stream: TextIO, renderer: Any) -> logging.Handler:
    """A standard-library handler rendering each record as structlog renders its own events:
    `event`, `logger`, `level`, `timestamp`, and the traceback as `exception`, on one line."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                IsoTimestamp(),
                structlog.processors.format_exc_info,
            ],
        )
    )
    return handler


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
