"""A local durable spool: where the ingress keeps notifications while the broker cannot take them.

Each notification is one file, written to a temporary name, fsynced, renamed into place and the
folder fsynced, all before the ingress answers 200. A background task publishes the files in
order once the broker is back and deletes each only after its confirm. A restart finds and
drains what an earlier run left. One process owns a spool folder at a time (an flock).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import time
from pathlib import Path
from typing import IO

import structlog

from shared import metrics
from shared.broker import Outgoing, Publisher, send
from shared.errors import BridgeError, BrokerUnavailable

log = structlog.get_logger("spool")

SUFFIX = ".msg"
# Wait this long before retrying the drain after the broker refused a spooled message.
DRAIN_RETRY_S = 1.0


class SpoolError(BridgeError):
    """The spool cannot take a notification: full, or its folder is not writable."""


def _encode(message: Outgoing) -> bytes:
    envelope = {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "message_id": message.message_id,
        "correlation_id": message.correlation_id,
        "headers": dict(message.headers),
    }
    return json.dumps(envelope, separators=(",", ":")).encode() + b"\n" + message.body


def _decode(data: bytes) -> Outgoing:
    head, _, body = data.partition(b"\n")
    envelope = json.loads(head)
    return Outgoing(
        exchange=envelope["exchange"],
        routing_key=envelope["routing_key"],
        body=body,
        message_id=envelope["message_id"],
        correlation_id=envelope["correlation_id"],
        headers=envelope["headers"],
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Append-only files, oldest first; `append` returns once the notification is on disk."""

    def __init__(self, folder: Path, *, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._entries: dict[Path, int] = {}  # spooled file -> size, in order of arrival
        self._bytes = 0
        self._sequence = itertools.count()
        self._lock_file: IO[bytes] | None = None
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self.writable = False

    @property
    def depth(self) -> int:
        return len(self._entries)

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = (self.folder / ".lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            lock.close()
            raise SpoolError(f"spool folder {self.folder} is in use by another process") from error
        self._lock_file = lock
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            size = path.stat().st_size
            self._entries[path] = size
            self._bytes += size
        for leftover in self.folder.glob("*.tmp"):
            leftover.unlink()  # never renamed into place, so never answered 200

    async def start(self, publisher: Publisher) -> None:
        """Take the folder, pick up what an earlier run left, and start draining."""
        try:
            await asyncio.to_thread(self._open)
            self.writable = True
        except (OSError, SpoolError) as error:
            log.error("spool_unwritable", folder=str(self.folder), error=str(error))
        if self._entries:
            log.warning("spool_found", depth=self.depth, folder=str(self.folder))
            self._wake.set()
        self._update_metrics()
        self._drainer = asyncio.create_task(self._drain_forever(publisher))

    async def stop(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _write(self, path: Path, data: bytes) -> None:
        temporary = path.with_suffix(".tmp")
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(path)
        _fsync_dir(self.folder)

    async def append(self, message: Outgoing) -> None:
        """Store `message` durably (fsync) or raise SpoolError."""
        if not self.writable:
            raise SpoolError(f"spool folder {self.folder} is not writable")
        data = _encode(message)
        if self._bytes + len(data) > self.max_bytes:
            raise SpoolError(f"spool is full ({self._bytes} of {self.max_bytes} bytes)")
        name = f"{time.time_ns():020d}-{next(self._sequence):08d}{SUFFIX}"
        path = self.folder / name
        self._bytes += len(data)  # reserve the room before yielding to other appends
        try:
            await asyncio.to_thread(self._write, path, data)
        except OSError as error:
            self._bytes -= len(data)
            raise SpoolError(f"cannot write to spool folder {self.folder}: {error}") from error
        self._entries[path] = len(data)
        self._update_metrics()
        self._wake.set()

    def _update_metrics(self) -> None:
        metrics.SPOOL_DEPTH.set(self.depth)
        oldest = next(iter(self._entries), None)
        age_s = time.time() - int(oldest.name.split("-")[0]) / 1e9 if oldest else 0.0
        metrics.SPOOL_OLDEST_AGE.set(max(age_s, 0.0))

    async def _drain_forever(self, publisher: Publisher) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.drain(publisher)
            except BrokerUnavailable as error:
                log.warning("spool_drain_paused", error=str(error), depth=self.depth)
                await asyncio.sleep(DRAIN_RETRY_S)
                self._wake.set()

    async def drain(self, publisher: Publisher) -> int:
        """Publish every spooled notification in order, deleting each after its confirm."""
        drained = 0
        while self._entries:
            path = next(iter(self._entries))
            data = await asyncio.to_thread(path.read_bytes)
            try:
                message = _decode(data)
            except (ValueError, KeyError, TypeError) as error:
                # Kept beside the spool for an operator; it cannot block the ones behind it.
                await asyncio.to_thread(path.rename, path.with_suffix(".bad"))
                self._bytes -= self._entries.pop(path)
                log.error("spool_entry_unreadable", file=str(path), error=str(error))
                continue
            await send(publisher, message)
            await asyncio.to_thread(path.unlink)
            self._bytes -= self._entries.pop(path)
            drained += 1
            self._update_metrics()
        if drained:
            log.info("spool_drained", count=drained)
        return drained
