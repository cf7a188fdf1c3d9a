"""What the ingress and workers need of the broker: protocols, and the aio-pika side of it."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection

from shared import topology
from shared.errors import BrokerUnavailable
from shared.settings import Settings
from shared.tls import NoNodeAnswered, client_context, first_answering, needs_tls

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


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The context every amqps:// connection uses; None when no URL needs TLS."""
    if not needs_tls(settings.amqp_urls):
        return None
    return client_context(settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file)


def address(url: str) -> str:
    """host:port of a broker URL, how errors and logs name a node (never its credentials)."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{parts.hostname}:{port}"


class Nodes:
    """The broker's nodes (BRIDGE_AMQP_URL) and how to reach one that answers.

    Each connect tries the nodes in order, starting after the one it reached last time: a
    process that lost its node goes to the next one and tries the lost one last.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.urls = settings.amqp_urls
        self.context = ssl_context(settings)
        self._next = 0
        self.current: str | None = None  # host:port of the node last connected to

    async def connect(self, role: str) -> AbstractConnection:
        """An aio-pika connection to the first node that answers, named for its role.

        Raises BrokerCertificateError when a node's certificate was refused and none answered,
        BrokerUnavailable when no node answered.
        """

        async def attempt(index: int) -> AbstractConnection:
            return await aio_pika.connect(
                self.urls[index],
                ssl_context=self.context,
                timeout=self.settings.amqp_connect_timeout_s,
                client_properties={"connection_name": connection_name(role)},
            )

        addresses = [address(url) for url in self.urls]
        try:
            connection, index = await first_answering(
                addresses, self._next, attempt, lambda e: f"{type(e).__name__}: {e}"
            )
        except NoNodeAnswered as error:
            raise BrokerUnavailable(str(error)) from error.__cause__
        self._next = (index + 1) % len(addresses)
        self.current = addresses[index]
        return connection


async def connect(settings: Settings, role: str) -> AbstractConnection:
    """A connection to the first node of BRIDGE_AMQP_URL that answers (callers own reconnecting)."""
    return await Nodes(settings).connect(role)


async def declare_topology(settings: Settings) -> topology.Names:
    """Connect briefly and declare the namespace's exchanges and queues."""
    connection = await connect(settings, "topology")
    async with connection, connection.channel() as channel:
        return await topology.declare(
            channel,
            settings.namespace,
            tiers_s=settings.retry_tiers_s,
            delivery_limit=settings.delivery_limit,
            initial_group_size=settings.quorum_initial_group_size,
        )
