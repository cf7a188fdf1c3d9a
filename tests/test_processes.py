"""The `bridge` processes as operators run them: key minting, graceful stop, worker status."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestClient

from shared.keys import KeyRing
from shared.models import KeyClaims
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.conftest import AMQP_URL, TEST_SECRETS
from tests.support.pipeline import settings_env
from tests.support.tcpproxy import TcpProxy
from tests.support.vouchers import encode, key, voucher
from workers.main import status_app
from workers.runner import Incoming, Outcome, Runner

TARGET = urlsplit(AMQP_URL)
AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


async def bridge(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_key_mint_prints_a_key_that_verifies(settings: Settings) -> None:
    process = await bridge(
        "key",
        "mint",
        "--location",
        "aH43yx2",
        "--request",
        "124",
        "--amount-cents",
        "2500",
        env={**os.environ, **settings_env(settings)},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
    claims = KeyRing(TEST_SECRETS).verify(out.decode().strip())
    assert claims == KeyClaims(location_id="aH43yx2", request_id="124", amount_cents=2500)


async def _until_ready(url: str, timeout_s: float = 20) -> None:
    async def poll() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout_s)


async def test_sigterm_finishes_the_in_flight_publish_then_exits(
    make_settings: Callable[..., Settings], broker: Names, channel: AbstractChannel
) -> None:
    async with TcpProxy(TARGET.hostname or "127.0.0.1", TARGET.port or 5672) as proxy:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        settings = make_settings(
            amqp_url=proxy.amqp_url(), http_port=port, spool_max_bytes=0, publish_timeout_s=20
        )
        process = await bridge("ingress", env={**os.environ, **settings_env(settings)})
        try:
            base = f"http://127.0.0.1:{port}"
            await _until_ready(f"{base}/readyz")
            proxy.pause()  # the confirm cannot arrive: the request stays in flight
            async with aiohttp.ClientSession() as session:
                posting = asyncio.create_task(
                    session.post(
                        f"{base}/notifications/jackpot/reserve",
                        params={"notificationKey": key()},
                        data=encode(voucher()),
                        headers={"Content-Type": "application/json"},
                    )
                )
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                assert not posting.done()
                proxy.resume()
                response = await asyncio.wait_for(posting, 20)
                assert response.status == 200
            assert await asyncio.wait_for(process.wait(), 20) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    queue = await channel.declare_queue(broker.queue(Stage.RESERVATIONS), passive=True)
    assert queue.declaration_result.message_count == 1


async def test_worker_status_server_reports_readiness_and_metrics(
    settings: Settings, broker: Names, aiohttp_client: AiohttpClient
) -> None:
    async def handle(message: Incoming) -> Outcome:
        return Outcome()

    runner = Runner(settings, {Stage.LIFECYCLE: handle})
    client = await aiohttp_client(status_app(runner))
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.wait_for(runner.connected.wait(), 10)
        ready = await client.get("/readyz")
        assert ready.status == 200
        assert (await ready.json())["status"] == "ready"
        metrics = await (await client.get("/metrics")).text()
        assert "bridge_stage_messages_total" in metrics
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", *args, "--quiet", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs the broker's own CLI")
async def test_connections_and_consumers_are_named_for_the_dashboard(
    settings: Settings, broker: Names
) -> None:
    async def handle(message: Incoming) -> Outcome:
        return Outcome()

    runner = Runner(settings, {Stage.LIFECYCLE: handle}, role="worker lifecycle")
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.wait_for(runner.connected.wait(), 10)
        expected = f"{socket.gethostname()} pid {os.getpid()}"
        consumers = await asyncio.to_thread(
            rabbitmqctl, "list_consumers", "queue_name", "consumer_tag"
        )
        ours = [line for line in consumers.splitlines() if broker.queue(Stage.LIFECYCLE) in line]
        assert len(ours) == 1
        assert f"voucher-bridge lifecycle {expected}" in ours[0]
        connections = await asyncio.to_thread(rabbitmqctl, "list_connections", "client_properties")
        assert f"voucher-bridge worker lifecycle {expected}" in connections
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
