"""The log writer batches a loop turn's lines into one write and loses none."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import structlog

from shared.logs import IsoTimestamp, LoopBatchedWriter, library_handler, redact_url


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_one_loop_turn_is_one_write() -> None:
    stream = CountingStream()
    writer = LoopBatchedWriter(stream)
    for i in range(5):
        writer.msg(f"line {i}")
    assert stream.getvalue() == ""
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(5)]


def test_outside_a_loop_lines_are_written_at_once() -> None:
    stream = CountingStream()
    writer = LoopBatchedWriter(stream)
    writer.info("now")
    assert stream.getvalue() == "now\n"


def test_pending_lines_are_written_on_flush() -> None:
    stream = CountingStream()
    writer = LoopBatchedWriter(stream)

    async def log_then_stop() -> None:
        writer.msg("last words")

    asyncio.run(log_then_stop())
    writer.flush()
    assert stream.getvalue() == "last words\n"


def test_redact_url_drops_query_and_credentials() -> None:
    url = "https://user:pw@bucket.example:8443/v/1.pdf?X-Amz-Signature=s3cret&Expires=1"
    assert redact_url(url) == "https://bucket.example:8443/v/1.pdf"
    assert redact_url(None) is None


def test_timestamps_are_iso_utc_and_move_with_the_clock() -> None:
    from datetime import UTC, datetime

    stamp = IsoTimestamp()
    first = stamp(None, "info", {})["timestamp"]
    second = stamp(None, "info", {})["timestamp"]
    parsed = datetime.fromisoformat(first)
    assert parsed.tzinfo == UTC
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 5
    assert first.endswith("Z")
    assert second >= first


def test_library_records_are_json_lines_with_their_traceback() -> None:
    # aiormq logs a lost connection through the standard library, traceback included.
    stream = io.StringIO()
    renderer = structlog.processors.JSONRenderer()
    logger = logging.getLogger("tests.library")
    logger.propagate = False
    logger.addHandler(library_handler(stream, renderer))
    try:
        try:
            raise ConnectionError("broker forced connection closure")
        except ConnectionError:
            logger.exception("Unexpected connection close from %s", "rabbitmq")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "Unexpected connection close from rabbitmq"
    assert event["logger"] == "tests.library"
    assert event["level"] == "error"
    assert "ConnectionError: broker forced connection closure" in event["exception"]
    assert event["timestamp"].endswith("Z")
