"""The OpenAPI 3 description of every ingress route, built from the same models the code uses."""

from __future__ import annotations

from functools import cache
from typing import Any

from shared.intake import MAX_AMOUNT_CENTS
from shared.models import Voucher

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {**_json(_ERROR, description), **extra}


def _status(*values: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": list(values)}},
    }


# What Doshii documents of `card_activate`'s data; the credentials are listed so the schema says
# that they are accepted (and dropped), and every other field is allowed.
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
_CARD_ACTIVATE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "locationId", "status", "requestData"],
    "properties": {
        "id": _ID,
        "locationId": _ID,
        "status": {"type": "string", "minLength": 1, "maxLength": 32},
        "posTerminalId": {"type": "string", "maxLength": 64},
        "uri": {"type": "string"},
        "requestData": {
            "type": "object",
            "required": ["amount"],
            "properties": {
                "amount": {
                    "type": "string",
                    "pattern": f"^[1-9][0-9]{{0,{len(str(MAX_AMOUNT_CENTS)) - 2}}}$",
                    "description": "Whole cents, as a string of digits.",
                },
                "cardRef": {"type": "string", "minLength": 1, "maxLength": 128},
                "cardAuthorisationKey": {"type": "string"},
                "cardProviderAuthId": {"type": "string"},
                "cardProviderAuthPassword": {"type": "string"},
            },
        },
    },
}
# `data` is each event's own: only card_activate's is read (and must be CardActivateData).
_DOSHII_WEBHOOK: dict[str, Any] = {
    "type": "object",
    "description": "A Doshii webhook. No `event` (or an empty body) is Doshii's verification "
    "check; only `card_activate` with `status: pending` is published, and its `data` must be "
    "a CardActivateData; every other event is answered 200 and ignored.",
    "properties": {"event": {"type": ["string", "null"], "maxLength": 64}, "data": {}},
}


@cache
def openapi_document() -> dict[str, Any]:
    voucher = Voucher.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = voucher.pop("$defs", {})
    retry_after = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "voucher-bridge ingress",
            "version": "1.0.0",
            "description": "Receives Jackpot voucher notifications and stores them in RabbitMQ "
            "(or the local spool) before answering 200.",
        },
        "paths": {
            "/notifications/jackpot/reserve": {
                "post": {
                    "operationId": "receiveJackpotNotification",
                    "summary": "A Jackpot voucher notification (RESERVED, READY, or later states)",
                    "parameters": [
                        {
                            "name": "notificationKey",
                            "in": "query",
                            "required": True,
                            "description": "The key voucher-bridge minted for this reservation.",
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Voucher"}}
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status", "messageId"],
                                "properties": {
                                    "status": {"type": "string", "enum": ["accepted", "spooled"]},
                                    "messageId": {"type": "string"},
                                },
                            },
                            "Stored: confirmed by the broker, or fsynced to the spool.",
                        ),
                        "400": _error("The body is not JSON, or not a voucher."),
                        "403": _error("The notificationKey is missing or does not verify."),
                        "413": _error("The body is larger than 64 KiB."),
                        "415": _error("The Content-Type is not application/json."),
                        "503": _error(
                            "Not stored: the broker and the spool cannot take it now.",
                            headers=retry_after,
                        ),
                    },
                }
            },
            "/notifications/doshii": {
                "post": {
                    "operationId": "receiveDoshiiWebhook",
                    "summary": "A Doshii webhook: a till's card_activate, or Doshii's check. "
                    "Served only when BRIDGE_DOSHII_WEBHOOK_AUTH is set.",
                    "security": [{"doshiiBasic": []}],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/DoshiiWebhook"}
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status"],
                                "properties": {
                                    "status": {
                                        "type": "string",
                                        "enum": ["accepted", "spooled", "ignored"],
                                    },
                                    "messageId": {"type": "string"},
                                    "detail": {"type": "string"},
                                },
                            },
                            "A pending card_activate stored (confirmed by the broker, or "
                            "fsynced to the spool), or another event (or none) ignored.",
                        ),
                        "400": _error("The body is not JSON, or not a Doshii event."),
                        "401": _error(
                            "The Basic credentials are missing or not registered.",
                            headers={
                                "WWW-Authenticate": {
                                    "description": "The Basic challenge",
                                    "schema": {"type": "string"},
                                }
                            },
                        ),
                        "413": _error("The body is larger than 64 KiB."),
                        "415": _error("The Content-Type is not application/json."),
                        "503": _error(
                            "Not stored: the broker and the spool cannot take it now.",
                            headers=retry_after,
                        ),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is alive.",
                    "responses": {"200": _json(_status("alive"), "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Whether notifications can be stored now.",
                    "responses": {
                        "200": _json(
                            _status("ready", "degraded"),
                            "Ready, or degraded: accepting into the spool while the broker is "
                            "away or the spool drains.",
                        ),
                        "503": _json(_status("unavailable"), "Not able to store notifications."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics.",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
                }
            },
        },
        "components": {
            "securitySchemes": {"doshiiBasic": {"type": "http", "scheme": "basic"}},
            "schemas": {
                **defs,
                "Voucher": voucher,
                "DoshiiWebhook": _DOSHII_WEBHOOK,
                "CardActivateData": _CARD_ACTIVATE,
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {}},
                },
            },
        },
    }
