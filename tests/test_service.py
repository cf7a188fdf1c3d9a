"""How a long-lived service reports errors the event loop finds on its own."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from shared.service import quiet_connection_errors


class Loop:
    """Records what would reach asyncio's default handler."""

    def __init__(self) -> None:
        self.defaults: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.defaults.append(context)


def test_a_failed_handshake_left_unread_is_one_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = Loop()
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    context = {"message": "Future exception was never retrieved", "exception": refused}
    quiet_connection_errors(loop, context)  # type: ignore[arg-type]
    assert loop.defaults == []
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "SSLCertVerificationError" in record.getMessage()
    assert record.exc_info is None


def test_anything_else_goes_to_the_default_handler() -> None:
    loop = Loop()
    for context in (
        {"message": "Future exception was never retrieved", "exception": ValueError("bug")},
        {"message": "Task was destroyed but it is pending!"},
        {"message": "Exception in callback", "exception": OSError("socket")},
    ):
        quiet_connection_errors(loop, context)  # type: ignore[arg-type]
    assert len(loop.defaults) == 3
