"""amqps:// against real RabbitMQ TLS listeners (the local cluster's), certificates by trustme.

The ingress's own publisher and a worker (aio-pika) each go through TLS; a CA we do not trust
and a host name the certificate does not name are both refused with the broker and the reason,
and nothing falls back to plain AMQP.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingress.app import NOTIFICATION_PATH, create_app
from shared import topology
from shared.broker import Nodes, connect, ssl_context
from shared.errors import BrokerCertificateError, SettingsError
from shared.publisher import ConfirmedPublisher
from shared.settings import Settings, load_settings
from shared.topology import Stage
from tests.support.cluster import REPO, Cluster
from tests.support.pipeline import settings_env
from tests.support.served import RunnerTestServer
from tests.support.vouchers import encode, key, voucher
from workers.runner import Incoming, Outcome, Runner

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def tls_settings(cluster: Cluster, make_settings: Callable[..., Settings]) -> Settings:
    """This test's namespace on node 1's TLS listener, trusting the cluster's CA."""
    return make_settings(amqp_url=cluster.tls_url(1), amqp_ca_file=cluster.tls_dir / "ca.pem")


@pytest.fixture
async def tls_namespace(tls_settings: Settings) -> AsyncIterator[Settings]:
    """The namespace declared through TLS, and deleted afterwards."""
    connection = await connect(tls_settings, "test")
    async with connection, connection.channel() as channel:
        await topology.declare(
            channel,
            tls_settings.namespace,
            tiers_s=tls_settings.retry_tiers_s,
            delivery_limit=tls_settings.delivery_limit,
        )
        try:
            yield tls_settings
        finally:
            await topology.delete(
                channel, tls_settings.namespace, tiers_s=tls_settings.retry_tiers_s
            )


async def test_ingress_publishes_and_a_worker_consumes_over_tls(
    cluster: Cluster,
    tls_namespace: Settings,
    aiohttp_client: Callable[[RunnerTestServer], Awaitable[Client]],
) -> None:
    settings = tls_namespace
    client = await aiohttp_client(RunnerTestServer(create_app(settings, spool=False)))
    body = voucher()
    answer = await client.post(
        NOTIFICATION_PATH,
        data=encode(body),
        params={"notificationKey": key()},
        headers={"Content-Type": "application/json"},
    )
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["status"] == "accepted"  # confirmed by the broker, not spooled

    handled: list[Incoming] = []

    async def handle(message: Incoming) -> Outcome:
        handled.append(message)
        return Outcome()

    runner = Runner(settings, {Stage.RESERVATIONS: handle})
    await asyncio.wait_for(runner.run(asyncio.Event(), drain=True), 30)
    assert [m.message_id for m in handled] == [f"{body['id']}:RESERVED"]
    assert runner.nodes.current == f"localhost:{cluster.tls_port(1)}"


async def test_a_client_certificate_is_presented_when_configured(
    cluster: Cluster, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        amqp_url=cluster.tls_url(2),
        amqp_ca_file=cluster.tls_dir / "ca.pem",
        amqp_cert_file=cluster.tls_dir / "client.pem",
    )
    connection = await connect(settings, "test")
    async with connection:
        assert not connection.is_closed
    publisher = ConfirmedPublisher(settings.amqp_urls, ssl_context=ssl_context(settings))
    await publisher.start()
    try:
        assert await publisher.wait_ready(10)
    finally:
        await publisher.close()


@pytest.fixture
def untrusted_ca(tmp_path: Path) -> Path:
    """A CA the cluster's certificate does not chain to."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


async def test_an_untrusted_ca_is_refused_naming_the_broker(
    cluster: Cluster, make_settings: Callable[..., Settings], untrusted_ca: Path
) -> None:
    settings = make_settings(amqp_url=cluster.tls_url(1), amqp_ca_file=untrusted_ca)
    where = f"localhost:{cluster.tls_port(1)}"
    with pytest.raises(BrokerCertificateError, match=f"broker {where}: .*certificate") as caught:
        await connect(settings, "test")
    # What OpenSSL says when the chain ends at a CA we do not trust (the server sends its CA).
    untrusted = (
        "(unable to get local issuer certificate|self-signed certificate in certificate chain)"
    )
    assert caught.match(untrusted)

    publisher = ConfirmedPublisher(settings.amqp_urls, ssl_context=ssl_context(settings))
    with pytest.raises(BrokerCertificateError, match=f"broker {where}: .*{untrusted}"):
        await publisher.start()
    assert not publisher.ready
    await publisher.close()


async def test_a_host_name_the_certificate_does_not_name_is_refused(
    cluster: Cluster, make_settings: Callable[..., Settings]
) -> None:
    # The certificate names "localhost"; 127.0.0.1 is the same listener under another name.
    url = cluster.tls_url(1, host="127.0.0.1")
    settings = make_settings(amqp_url=url, amqp_ca_file=cluster.tls_dir / "ca.pem")
    where = f"127.0.0.1:{cluster.tls_port(1)}"
    with pytest.raises(BrokerCertificateError, match=f"broker {where}: .*mismatch"):
        await Nodes(settings).connect("test")
    publisher = ConfirmedPublisher(settings.amqp_urls, ssl_context=ssl_context(settings))
    with pytest.raises(BrokerCertificateError, match=f"broker {where}: .*mismatch"):
        await publisher.start()
    await publisher.close()


async def test_a_refused_node_is_skipped_when_another_verifies(
    cluster: Cluster, make_settings: Callable[..., Settings]
) -> None:
    """In a list, a node whose name does not verify is passed over, never used in plain."""
    wrong = cluster.tls_url(1, host="127.0.0.1")
    settings = make_settings(
        amqp_url=f"{wrong},{cluster.tls_url(3)}", amqp_ca_file=cluster.tls_dir / "ca.pem"
    )
    nodes = Nodes(settings)
    connection = await nodes.connect("test")
    async with connection:
        assert nodes.current == f"localhost:{cluster.tls_port(3)}"


def test_the_cli_stops_with_the_reason_and_no_traceback(
    cluster: Cluster, untrusted_ca: Path
) -> None:
    env = {
        **os.environ,
        **settings_env(_cli_settings(cluster, untrusted_ca)),
        "BRIDGE_LOG_JSON": "1",
    }
    for command in (["dlq", "list"], ["ingress"], ["worker", "doshii"]):
        done = subprocess.run(
            [sys.executable, "-m", "bridge", *command],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert f"broker localhost:{cluster.tls_port(1)}: TLS certificate refused" in done.stderr
        assert "BRIDGE_AMQP_CA_FILE" in done.stderr


def _cli_settings(cluster: Cluster, ca_file: Path) -> Settings:
    return Settings(
        amqp_url=cluster.tls_url(1),
        amqp_ca_file=ca_file,
        namespace="t-cli-tls",
        key_secrets="test-secret-one-0123456789",
        http_port=0,
        worker_http_port=0,
        jackpot_api_key="k",
        doshii_client_id="c",
        doshii_client_secret="s",
        pdf_hosts="http://127.0.0.1:9",
    )


def test_tls_files_that_do_not_load_stop_at_start_naming_the_variable(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    base: dict[str, Any] = {
        "amqp_url": "amqps://guest:guest@localhost:5671/",
        "key_secrets": "test-secret-one-0123456789",
        "jackpot_api_key": "k",
        "doshii_client_id": "c",
        "doshii_client_secret": "s",
    }
    with pytest.raises(SettingsError, match="BRIDGE_AMQP_CA_FILE"):
        load_settings(**base, amqp_ca_file=not_pem)
    with pytest.raises(SettingsError, match="BRIDGE_AMQP_CA_FILE"):
        load_settings(**base, amqp_ca_file=tmp_path / "missing.pem")
    with pytest.raises(SettingsError, match="BRIDGE_AMQP_KEY_FILE"):
        load_settings(**base, amqp_key_file=not_pem)
    with pytest.raises(SettingsError, match="BRIDGE_AMQP_URL"):
        load_settings(**{**base, "amqp_url": "amqps://localhost:5671/,http://x/"})
