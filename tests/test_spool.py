"""The ingress keeps accepting through a broker outage: spool to disk, drain in order later."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingress.app import NOTIFICATION_PATH, create_app
from ingress.spool import SUFFIX
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.conftest import AMQP_URL
from tests.support.tcpproxy import TcpProxy
from tests.support.vouchers import encode, key, voucher

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[[web.Application], Awaitable[Client]]
JSON = {"Content-Type": "application/json"}
TARGET = urlsplit(AMQP_URL)


async def post(client: Client, body: dict[str, Any]) -> Any:
    return await client.post(
        NOTIFICATION_PATH, data=encode(body), params={"notificationKey": key()}, headers=JSON
    )


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    async def poll() -> None:
        while not await condition():  # noqa: ASYNC110 - state lives in the broker and on disk
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


async def ready_status(client: Client) -> str:
    return str((await (await client.get("/readyz")).json())["status"])


async def queued_ids(channel: AbstractChannel, queue: str) -> list[str]:
    q = await channel.get_queue(queue, ensure=False)
    ids = []
    while (message := await q.get(no_ack=True, fail=False)) is not None:
        ids.append(json.loads(message.body)["id"])
    return ids


def spooled(root: Path) -> list[Path]:
    """Every spooled notification under the spool root, whichever process's folder holds it."""
    return sorted(root.rglob(f"*{SUFFIX}"))


async def test_outage_is_spooled_with_200_then_drained_in_order(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    channel: AbstractChannel,
    broker: Names,
) -> None:
    async with TcpProxy(TARGET.hostname or "127.0.0.1", TARGET.port or 5672) as proxy:
        settings = make_settings(amqp_url=proxy.amqp_url())
        client = await aiohttp_client(create_app(settings))
        await until(lambda: _is(client, "ready"))

        await proxy.cut()
        bodies = [voucher() for _ in range(10)]
        for body in bodies:
            response = await post(client, body)
            assert response.status == 200
            assert (await response.json())["status"] == "spooled"
        assert len(spooled(settings.spool_dir)) == 10
        assert await ready_status(client) == "degraded"
        metrics = await (await client.get("/metrics")).text()
        assert "bridge_spool_depth 10.0" in metrics

        await proxy.restore()
        await until(lambda: _no_files(settings.spool_dir))
        await until(lambda: _is(client, "ready"))
    queue = broker.queue(Stage.RESERVATIONS)
    assert await queued_ids(channel, queue) == [b["id"] for b in bodies]


async def _is(client: Client, status: str) -> bool:
    return await ready_status(client) == status


async def _no_files(folder: Path) -> bool:
    return not spooled(folder)


async def test_full_spool_answers_503(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    broker: Names,
) -> None:
    async with TcpProxy(TARGET.hostname or "127.0.0.1", TARGET.port or 5672) as proxy:
        settings = make_settings(amqp_url=proxy.amqp_url(), spool_max_bytes=1500)
        client = await aiohttp_client(create_app(settings))
        await until(lambda: _is(client, "ready"))
        await proxy.cut()
        statuses = [(await post(client, voucher())).status for _ in range(5)]
        assert statuses[0] == 200
        assert statuses[-1] == 503
        # Once full, every later one is refused: 200s first, then only 503s.
        assert statuses.index(503) == statuses.count(200)
        await proxy.restore()


async def test_spool_on_a_file_answers_503(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    broker: Names,
) -> None:
    # A path that cannot be a folder stands in for an unwritable disk, even as root.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    async with TcpProxy(TARGET.hostname or "127.0.0.1", TARGET.port or 5672) as proxy:
        settings = make_settings(amqp_url=proxy.amqp_url(), spool_dir=blocker / "spool")
        client = await aiohttp_client(create_app(settings))
        await until(lambda: _is(client, "ready"))
        await proxy.cut()
        response = await post(client, voucher())
        assert response.status == 503
        assert "spool" in (await response.json())["detail"]
        await proxy.restore()


async def test_a_restart_drains_what_the_last_run_left(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    channel: AbstractChannel,
    broker: Names,
) -> None:
    bodies = [voucher() for _ in range(3)]
    async with TcpProxy(TARGET.hostname or "127.0.0.1", TARGET.port or 5672) as proxy:
        settings = make_settings(amqp_url=proxy.amqp_url())
        first = await aiohttp_client(create_app(settings))
        await until(lambda: _is(first, "ready"))
        await proxy.cut()
        for body in bodies:
            assert (await post(first, body)).status == 200
        await first.close()
    assert len(spooled(settings.spool_dir)) == 3

    second = await aiohttp_client(create_app(make_settings()))
    await until(lambda: _no_files(settings.spool_dir))
    await until(lambda: _is(second, "ready"))
    assert await queued_ids(channel, broker.queue(Stage.RESERVATIONS)) == [b["id"] for b in bodies]


async def test_two_ingresses_on_one_root_each_spool_in_a_folder_of_their_own(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    broker: Names,
) -> None:
    async with TcpProxy(TARGET.hostname or "127.0.0.1", TARGET.port or 5672) as proxy:
        settings = make_settings(amqp_url=proxy.amqp_url())
        first = await aiohttp_client(create_app(settings))
        second = await aiohttp_client(create_app(settings))
        await until(lambda: _is(first, "ready"))
        await until(lambda: _is(second, "ready"))
        await proxy.cut()
        for client in (first, second):
            response = await post(client, voucher())
            assert (await response.json())["status"] == "spooled"
        folders = {path.parent for path in spooled(settings.spool_dir)}
        assert len(folders) == 2
        assert all(folder.parent == settings.spool_dir for folder in folders)
        await proxy.restore()
        await until(lambda: _no_files(settings.spool_dir))
