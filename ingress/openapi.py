"""The OpenAPI 3 description of every ingress route, built from the same models the code uses."""

from __future__ import annotations

from functools import cache
from typing import Any

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
            "schemas": {
                **defs,
                "Voucher": voucher,
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {}},
                },
            }
        },
    }
