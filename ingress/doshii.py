"""Doshii's webhook on the ingress: Basic credentials checked in constant time, the event read.

The HTTP handler lives in `ingress.app` (it shares the confirmed publisher, the spool and the
error rendering); this module holds what it decides with, without I/O.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import SecretStr, ValidationError

from shared.intake import CARD_ACTIVATE, PENDING, CardActivate, WebhookEnvelope

DOSHII_WEBHOOK_PATH = "/notifications/doshii"
WWW_AUTHENTICATE = 'Basic realm="voucher-bridge doshii webhook", charset="UTF-8"'
# Registered credentials are a key and a token of a few dozen characters; nothing longer is ours.
MAX_AUTHORIZATION_CHARS = 1024


class BasicAuth:
    """The registered `authenticationKey:authenticationToken` pairs (several, for rotation)."""

    def __init__(self, pairs: Sequence[SecretStr]) -> None:
        self._pairs = [pair.get_secret_value().encode() for pair in pairs]

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def check(self, authorization: str | None) -> int | None:
        """The index of the pair that `Authorization: Basic ...` carries, or None.

        Every pair is compared, without stopping at a match, so the time taken says nothing
        about which pair (or how much of one) matched.
        """
        if not authorization or len(authorization) > MAX_AUTHORIZATION_CHARS:
            return None
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            given = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        matched: int | None = None
        for index, expected in enumerate(self._pairs):
            if hmac.compare_digest(given, expected) and matched is None:
                matched = index
        return matched


class WebhookProblem(Exception):
    """The body cannot be a Doshii event: a 400 naming why."""

    def __init__(self, error: str, detail: object) -> None:
        super().__init__(error)
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class Reading:
    """What a webhook body asks for: a pending sale to publish, or nothing (and why)."""

    event: str | None
    sale: CardActivate | None = None
    ignored: str | None = None


def _problems(error: ValidationError, prefix: str) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join([prefix, *(str(p) for p in problem["loc"])]).strip(".") or "body",
            "problem": problem["msg"],
        }
        for problem in error.errors(include_url=False, include_input=False)
    ]


def read_webhook(body: bytes) -> Reading:
    """Read a webhook body; WebhookProblem (a 400) when it is not JSON or not a Doshii event."""
    if not body.strip():
        return Reading(event=None, ignored="no event: verification check")
    try:
        envelope = WebhookEnvelope.model_validate_json(body)
    except ValidationError as error:
        kinds = {problem["type"] for problem in error.errors()}
        if "json_invalid" in kinds:
            raise WebhookProblem("invalid_json", "the body is not valid JSON") from error
        if "model_type" in kinds:
            raise WebhookProblem("invalid_event", "the body must be a JSON object") from error
        raise WebhookProblem("invalid_event", _problems(error, "")) from error
    if envelope.event is None:
        return Reading(event=None, ignored="no event: verification check")
    if envelope.event != CARD_ACTIVATE:
        return Reading(event=envelope.event, ignored=f"event {envelope.event!r} is not handled")
    data = envelope.data
    if not isinstance(data, dict):
        raise WebhookProblem(
            "invalid_event", [{"field": "data", "problem": "card_activate needs a data object"}]
        )
    status = data.get("status")
    if isinstance(status, str) and status != PENDING:
        # A request the till already settled: nothing to reserve, and Doshii must stop retrying.
        return Reading(event=envelope.event, ignored=f"card_activate is {status[:32]!r}")
    try:
        sale = CardActivate.model_validate(data)
    except ValidationError as error:
        raise WebhookProblem("invalid_event", _problems(error, "data")) from error
    return Reading(event=envelope.event, sale=sale)
