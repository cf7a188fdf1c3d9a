"""Fixtures shared by every test: a namespace of its own on the real broker, and settings."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from shared import topology
from shared.ledger import Ledger, create_pool, schema_for
from shared.settings import Settings
from tests.support.cluster import Cluster, ClusterUnavailable, running_cluster

AMQP_URL = os.environ.get("BRIDGE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get(
    "BRIDGE_DATABASE_URL", "postgresql://bridge:bridge@127.0.0.1:5432/bridge"
)
TEST_SECRETS = ["test-secret-one-0123456789", "test-secret-old-9876543210"]
# Short tiers keep retry tests quick while exercising the real TTL queues.
TEST_TIERS_S = [1, 2]


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_settings(namespace: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for this test's namespace; keyword arguments override any field."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "namespace": namespace,
            "key_secrets": ",".join(TEST_SECRETS),
            "http_port": 0,
            "jackpot_api_url": "http://127.0.0.1:9",
            "jackpot_api_key": "jackpot-test-key",
            "doshii_api_url": "http://127.0.0.1:9",
            "doshii_client_id": "bridge-test",
            "doshii_client_secret": "doshii-test-secret-0123456789abcdef",
            "pdf_hosts": "http://127.0.0.1:9",
            "pdf_dir": tmp_path / "pdfs",
            "spool_dir": tmp_path / "spool",
            "retry_tiers_s": ",".join(map(str, TEST_TIERS_S)),
            "publish_timeout_s": 2.0,
            "partner_timeout_s": 2.0,
            "drain_timeout_s": 5.0,
            "worker_http_port": 0,
            "log_json": True,
            "database_url": DATABASE_URL,
            "database_schema": schema_for(namespace),
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def channel(amqp: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    async with amqp.channel() as channel:
        yield channel


@pytest.fixture
async def ledger_schema(settings: Settings) -> AsyncIterator[str]:
    """This test's ledger: a schema of its own on the real PostgreSQL, dropped afterwards."""
    pool = await create_pool(settings, max_size=1)
    try:
        await Ledger(pool).upgrade(settings.database_schema)
        yield settings.database_schema
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
        await pool.close()


@pytest.fixture
async def ledger(settings: Settings, ledger_schema: str) -> AsyncIterator[Ledger]:
    async with Ledger.open(settings) as opened:
        yield opened


@pytest.fixture
async def broker(
    channel: AbstractChannel, settings: Settings, ledger_schema: str
) -> AsyncIterator[topology.Names]:
    """This test's namespace on the real broker, and its ledger; both deleted afterwards."""
    names = await topology.declare(
        channel,
        settings.namespace,
        tiers_s=settings.retry_tiers_s,
        delivery_limit=settings.delivery_limit,
    )
    try:
        yield names
    finally:
        await topology.delete(channel, settings.namespace, tiers_s=settings.retry_tiers_s)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The local three-node cluster (scripts/rabbitmq-cluster.sh), up for the whole session."""
    try:
        with running_cluster(tmp_path_factory.mktemp("cluster-tls")) as started:
            yield started
    except ClusterUnavailable as error:
        pytest.skip(f"no local RabbitMQ cluster: {error}")


@pytest.fixture
def cluster_nodes(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster for a test that stops nodes: every node runs again afterwards."""
    try:
        yield cluster
    finally:
        cluster.start_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the tables tests filled in (hostile input, chaos ledger) at the end of the run."""
    from tests.support.report import TABLES, render

    for title, (columns, rows) in TABLES.items():
        terminalreporter.write_line("")
        terminalreporter.write_line(render(title, columns, rows))
