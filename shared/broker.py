"""What the ingress and workers need of the broker: protocols, and the aio-pika side of it."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractConnection

from shared import topology
from shared.settings import Settings

HeaderValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: persistent, mandatory, confirmed."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str | None = None
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    timestamp: datetime | None = None


class Publisher(Protocol):
    """A publisher that returns only once the broker confirmed, else raises BrokerUnavailable."""

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, HeaderValue] | None = None,
        correlation_id: str | None = None,
        content_type: str = "application/json",
        timestamp: datetime | None = None,
    ) -> None: ...

    async def close(self, timeout_s: float = 5.0) -> None: ...


async def send(publisher: Publisher, message: Outgoing) -> None:
    await publisher.publish(
        message.exchange,
        message.routing_key,
        message.body,
        message_id=message.message_id,
        headers=message.headers,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
    )


def connection_name(role: str) -> str:
    """How a connection shows in the RabbitMQ dashboard: role, host and pid."""
    return f"voucher-bridge {role} {socket.gethostname()} pid {os.getpid()}"


async def connect(settings: Settings, role: str) -> AbstractConnection:
    """An aio-pika connection named for its role (callers own reconnecting, if they need it)."""
    return await aio_pika.connect(
        settings.amqp_url.get_secret_value(),
        client_properties={"connection_name": connection_name(role)},
    )


async def declare_topology(settings: Settings) -> topology.Names:
    """Connect briefly and declare the namespace's exchanges and queues."""
    connection = await connect(settings, "topology")
    async with connection, connection.channel() as channel:
        return await topology.declare(
            channel,
            settings.namespace,
            tiers_s=settings.retry_tiers_s,
            delivery_limit=settings.delivery_limit,
        )
