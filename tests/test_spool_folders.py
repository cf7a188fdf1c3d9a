"""Spool folders on a shared root: one locked folder per process, adoption of what gone ones left.

A spool whose publisher was never started stands for an ingress whose broker is away: every
publish raises BrokerUnavailable, so what it appends stays on disk. `stop()` with files left
lets go of the lock without removing them, which is what a dead owner looks like to the others.
Draining goes to the real broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import prometheus_client
import pytest
from aio_pika.abc import AbstractChannel

from ingress.spool import (
    BAD_SUFFIX,
    LOCK_NAME,
    SUFFIX,
    Spool,
    folder_name,
    is_owned_folder,
    try_lock,
)
from shared.broker import Outgoing
from shared.models import Route
from shared.publisher import ConfirmedPublisher
from shared.topology import Names, Stage
from tests.conftest import AMQP_URL
from tests.support.vouchers import encode, voucher

MAX_BYTES = 1024 * 1024
# Long enough that only an explicit adopt() adopts, in the tests that call it themselves.
NEVER_S = 3600.0


@pytest.fixture
async def publisher() -> AsyncIterator[ConfirmedPublisher]:
    """Straight to the real broker."""
    started = ConfirmedPublisher(AMQP_URL, confirm_timeout_s=5.0)
    await started.start()
    assert await started.wait_ready(10.0)
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
def away() -> ConfirmedPublisher:
    """A publisher that never connects: the broker is away for whoever spools with it."""
    return ConfirmedPublisher(AMQP_URL)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def message(names: Names) -> Outgoing:
    body = voucher()
    return Outgoing(
        exchange=names.events,
        routing_key=Route.RESERVED,
        body=encode(body),
        message_id=f"{body['id']}:RESERVED",
        correlation_id=body["id"],
    )


def ids(messages: list[Outgoing]) -> list[str]:
    return [m.message_id.split(":")[0] for m in messages]


async def orphan(root: Path, names: Names, away: ConfirmedPublisher, count: int) -> list[Outgoing]:
    """A spool that took `count` notifications while the broker was away, then its process
    went: its folder stays, unlocked."""
    spool = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await spool.start(away)
    sent = [message(names) for _ in range(count)]
    for outgoing in sent:
        await spool.append(outgoing)
    await spool.stop()
    return sent


async def queued(channel: AbstractChannel, names: Names) -> list[str]:
    queue = await channel.get_queue(names.queue(Stage.RESERVATIONS), ensure=False)
    found = []
    while (got := await queue.get(no_ack=True, fail=False)) is not None:
        found.append(json.loads(got.body)["id"])
    return found


def files(root: Path, suffix: str = SUFFIX) -> list[Path]:
    return sorted(root.rglob(f"*{suffix}"))


def folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


async def until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    async def poll() -> None:
        while not check():  # noqa: ASYNC110 - the state is on disk
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


def lock_free(folder: Path) -> bool:
    """Nobody holds `folder`'s lock (checked by taking it for an instant)."""
    fd = try_lock(folder)
    if fd is None:
        return False
    os.close(fd)
    return True


def gauge(name: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


def test_folder_names_are_safe_and_only_they_are_adopted() -> None:
    assert folder_name("web-1.example", 42, "a1b2c3") == "web-1.example-42-a1b2c3"
    # Spaces, slashes and other letters become "_", and a name never starts hidden.
    assert folder_name("..odd host/é", 7, "00ff00") == "odd_host__-7-00ff00"
    assert folder_name("", 7, "00ff00") == "host-7-00ff00"
    assert len(folder_name("h" * 300, 1, "abcdef")) == 64 + len("-1-abcdef")
    assert is_owned_folder(folder_name("..odd host/é", 7, "00ff00"))
    for other in ("lost+found", ".web-42-a1b2c3.new", "web-42", "web-x-a1b2c3", "backup"):
        assert not is_owned_folder(other), other


async def test_each_spool_owns_a_locked_folder_that_goes_when_it_stops_empty(
    root: Path, away: ConfirmedPublisher
) -> None:
    first = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    second = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await first.start(away)
    await second.start(away)
    try:
        assert first.folder is not None
        assert second.folder is not None
        assert first.folder != second.folder
        host = folder_name(socket.gethostname(), os.getpid(), "")
        for folder in (first.folder, second.folder):
            assert folder.parent == root
            assert folder.name.startswith(host)
            assert is_owned_folder(folder.name)
            assert try_lock(folder) is None, f"{folder} is not locked by its owner"
        assert first.writable
        assert second.writable
    finally:
        await first.stop()
        await second.stop()
    assert folders(root) == []


async def test_orphaned_folders_are_adopted_at_start_and_drained_in_order_once(
    root: Path,
    away: ConfirmedPublisher,
    publisher: ConfirmedPublisher,
    channel: AbstractChannel,
    broker: Names,
) -> None:
    # Two processes spooled turn about, then both went.
    first = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    second = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await first.start(away)
    await second.start(away)
    sent = []
    for index in range(8):
        outgoing = message(broker)
        await (first if index % 2 == 0 else second).append(outgoing)
        sent.append(outgoing)
    await first.stop()
    await second.stop()
    assert len(folders(root)) == 2

    survivor = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await survivor.start(publisher)
    try:
        await until(lambda: folders(root) == [survivor.folder])
        assert not files(root)
    finally:
        await survivor.stop()
    assert await queued(channel, broker) == ids(sent)
    assert gauge("bridge_spool_depth") == 0


async def test_a_live_owner_keeps_its_folder_until_it_is_gone(
    root: Path,
    away: ConfirmedPublisher,
    publisher: ConfirmedPublisher,
    channel: AbstractChannel,
    broker: Names,
) -> None:
    owner = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await owner.start(away)
    sent = [message(broker) for _ in range(3)]
    for outgoing in sent:
        await owner.append(outgoing)
    # Adopting often, so the test sees the periodic pass take the folder once its owner goes.
    peer = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=0.1)
    await peer.start(publisher)
    try:
        assert await peer.adopt() == 0
        assert peer.depth == 0
        assert len(files(root)) == 3
        owned = owner.folder
        await owner.stop()
        await until(lambda: owned is not None and not owned.exists())
        assert not files(root)
    finally:
        await peer.stop()
    assert await queued(channel, broker) == ids(sent)


async def test_two_ingresses_adopting_at_once_take_each_folder_once(
    root: Path,
    away: ConfirmedPublisher,
    publisher: ConfirmedPublisher,
    channel: AbstractChannel,
    broker: Names,
) -> None:
    one = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    other = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    # On the absent broker, so nothing drains while they compete.
    await one.start(away)
    await other.start(away)
    sent = [*await orphan(root, broker, away, 4), *await orphan(root, broker, away, 4)]
    try:
        taken = await asyncio.gather(one.adopt(), other.adopt())
        assert sum(taken) == len(sent)
        assert one.depth + other.depth == len(sent)
    finally:
        await one.stop()
        await other.stop()
    # Whatever each took, all of it drains once from wherever it is now.
    survivor = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await survivor.start(publisher)
    try:
        await until(lambda: folders(root) == [survivor.folder])
    finally:
        await survivor.stop()
    assert sorted(await queued(channel, broker)) == sorted(ids(sent))
    assert folders(root) == []


async def test_files_of_the_single_folder_layout_are_drained_once_its_process_is_gone(
    root: Path,
    away: ConfirmedPublisher,
    publisher: ConfirmedPublisher,
    channel: AbstractChannel,
    broker: Names,
) -> None:
    # The layout before per-process folders: files straight in the root, its .lock held by the
    # one ingress of that version.
    sent = await orphan(root, broker, away, 3)
    (old,) = folders(root)
    for path in files(old):
        path.rename(root / path.name)
    (old / LOCK_NAME).unlink()
    old.rmdir()
    (root / "00000000000000000001-00000000.tmp").write_bytes(b"never answered")
    old_process = try_lock(root)
    assert old_process is not None

    spool = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await spool.start(publisher)
    try:
        assert spool.depth == 0, "took the files of an ingress that is still running"
        os.close(old_process)
        assert await spool.adopt() == 3
        # The root's lock is let go once its files are drained; the root itself stays.
        await until(lambda: lock_free(root))
        assert not files(root)
        assert not files(root, ".tmp")
    finally:
        await spool.stop()
    assert await queued(channel, broker) == ids(sent)


async def test_depth_and_oldest_age_count_adopted_files(
    root: Path, away: ConfirmedPublisher, broker: Names
) -> None:
    await orphan(root, broker, away, 3)
    oldest_s = int(files(root)[0].name.split("-")[0]) / 1e9
    before_s = time.time()
    spool = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await spool.start(away)
    try:
        after_s = time.time()
        assert spool.depth == 3
        assert gauge("bridge_spool_depth") == 3
        age_s = gauge("bridge_spool_oldest_age_seconds")
        assert before_s - oldest_s <= age_s <= after_s - oldest_s
        await spool.append(message(broker))
        assert gauge("bridge_spool_depth") == 4
        # The adopted file is still the oldest.
        assert gauge("bridge_spool_oldest_age_seconds") >= age_s
    finally:
        await spool.stop()


async def test_an_adopted_folder_with_an_unreadable_file_is_kept_for_an_operator(
    root: Path,
    away: ConfirmedPublisher,
    publisher: ConfirmedPublisher,
    channel: AbstractChannel,
    broker: Names,
) -> None:
    sent = await orphan(root, broker, away, 2)
    (left,) = folders(root)
    first, _ = files(left)
    first.write_bytes(b"not a spooled notification")
    spool = Spool(root, max_bytes=MAX_BYTES, adopt_interval_s=NEVER_S)
    await spool.start(publisher)
    try:
        await until(lambda: not files(root) and lock_free(left))
        assert [p.name for p in left.glob(f"*{BAD_SUFFIX}")] == [first.with_suffix(".bad").name]
        assert await spool.adopt() == 0, "a kept folder was adopted again"
    finally:
        await spool.stop()
    assert left.is_dir()
    assert await queued(channel, broker) == ids(sent[1:])
