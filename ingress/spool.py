"""A local durable spool: where the ingress keeps notifications while the broker cannot take them.

Each notification is one file, written to a temporary name, fsynced, renamed into place and the
folder fsynced, all before the ingress answers 200. A background task publishes the files in
order once the broker is back and deletes each only after its confirm.

Several ingress processes may share one spool root (`BRIDGE_SPOOL_DIR`). Each owns a folder of
its own under it, named `<host>-<pid>-<random>` and held by an flock on its `.lock` for the
process's life, so two processes never write to one folder. At start and every
`adopt_interval_s`, an ingress adopts the folders whose owner is gone (their lock is free): their
files join its own in one order (oldest first, by the time in their names), drain the same way,
and the folder is removed once empty. Files left directly in the root by the single-folder layout
of earlier versions are adopted the same way, under the root's own `.lock`, which an ingress of
that layout still running holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from shared import metrics
from shared.broker import Outgoing, Publisher, send
from shared.errors import BridgeError, BrokerUnavailable

log = structlog.get_logger("spool")

SUFFIX = ".msg"
BAD_SUFFIX = ".bad"
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
# Wait this long before retrying the drain after the broker refused a spooled message.
DRAIN_RETRY_S = 1.0
# Hostnames are at most 253 characters; a folder name does not need more than this of it.
HOST_CHARS_MAX = 64
# 3 random bytes (6 hex digits) tell apart two processes that reuse a pid on one host.
TOKEN_BYTES = 3
# An owned folder's name: what `folder_name` makes. Nothing else under the root (an operator's
# files, lost+found, a folder still being created, whose name starts with a dot) is adopted.
_OWNED = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*-[0-9]+-[0-9a-f]{6}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class SpoolError(BridgeError):
    """The spool cannot take a notification: full, or its folder is not writable."""


def folder_name(host: str, pid: int, token: str) -> str:
    """A process's own spool folder: `<host>-<pid>-<token>`, safe characters only, never hidden."""
    safe_host = _UNSAFE.sub("_", host)[:HOST_CHARS_MAX].lstrip(".-") or "host"
    return f"{safe_host}-{pid}-{token}"


def is_owned_folder(name: str) -> bool:
    """Whether `name` is a folder some ingress made for itself (and may be adopted)."""
    return _OWNED.match(name) is not None


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


def try_lock(folder: Path) -> int | None:
    """A descriptor holding `folder`'s lock exclusively, or None: another process holds it, or
    the folder is gone. The lock file is created when missing (a half-removed folder)."""
    try:
        # Python descriptors are not inherited by child processes, so the lock dies with us.
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _entry_time_ns(path: Path) -> int:
    return int(path.name.split("-")[0])


def _order(path: Path) -> tuple[str, str]:
    # Names start with the time they were spooled (zero-padded), so by name is oldest first;
    # two processes' files with one name are told apart by their folder.
    return path.name, str(path.parent)


@dataclass
class _Held:
    """A folder whose lock this process holds: its own, or one it adopted."""

    folder: Path
    lock_fd: int
    own: bool = False
    legacy_root: bool = False  # the spool root itself: files of the single-folder layout
    pending: int = 0  # its spooled files not drained yet (adopted folders only)


@dataclass
class _Claim:
    held: _Held
    files: list[tuple[Path, int]]  # spooled file -> size, oldest first


class Spool:
    """Append-only files, oldest first; `append` returns once the notification is on disk."""

    def __init__(self, root: Path, *, max_bytes: int, adopt_interval_s: float = 10.0) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.adopt_interval_s = adopt_interval_s
        self.folder: Path | None = None  # this process's own folder, once started
        # Spooled file -> size, oldest first: this process's own and those it adopted.
        self._entries: dict[Path, int] = {}
        self._bytes = 0
        self._sequence = itertools.count()
        self._held: dict[Path, _Held] = {}
        # Adopted folders left in place (files an operator must look at): not adopted again.
        self._kept: set[Path] = set()
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self.writable = False

    @property
    def depth(self) -> int:
        return len(self._entries)

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = folder_name(socket.gethostname(), os.getpid(), secrets.token_hex(TOKEN_BYTES))
        # Made under a hidden name and locked before it gets its real one, so no other ingress
        # ever sees it unlocked (and adopts it) while it is being set up.
        staging = self.root / f".{name}.new"
        staging.mkdir()
        fd = try_lock(staging)
        if fd is None:
            raise SpoolError(f"cannot lock a new spool folder in {self.root}")
        folder = self.root / name
        staging.rename(folder)
        _fsync_dir(self.root)
        self.folder = folder
        self._held[folder] = _Held(folder, fd, own=True)

    async def start(self, publisher: Publisher) -> None:
        """Take a folder of our own, adopt what gone processes left, and start draining."""
        try:
            await asyncio.to_thread(self._open)
            self.writable = True
        except (OSError, SpoolError) as error:
            log.error("spool_unwritable", folder=str(self.root), error=str(error))
        await self.adopt()
        self._update_metrics()
        self._drainer = asyncio.create_task(self._drain_forever(publisher))

    async def stop(self) -> None:
        """Stop draining and let go of every lock; an empty own folder is removed."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        held, self._held = list(self._held.values()), {}
        await asyncio.to_thread(self._let_go, held, set(self._entries))

    def _let_go(self, held: Iterable[_Held], undrained: set[Path]) -> None:
        for entry in held:
            if entry.own and not any(path.parent == entry.folder for path in undrained):
                self._remove(entry)
            os.close(entry.lock_fd)

    def _remove(self, held: _Held) -> bool:
        """Remove a drained folder (still locked by us); False when something is left in it."""
        left = [p.name for p in held.folder.iterdir() if p.name != LOCK_NAME]
        if left:
            log.warning(
                "spool_folder_kept",
                folder=str(held.folder),
                files=sorted(left)[:10],
                detail=f"left in place for an operator: files other than *{SUFFIX}",
            )
            return False
        try:
            (held.folder / LOCK_NAME).unlink()
            held.folder.rmdir()
        except OSError as error:
            # Another ingress opened the lock file at this instant: it finds the folder empty
            # and removes it itself.
            log.info("spool_folder_not_removed", folder=str(held.folder), error=str(error))
        return True

    def _write(self, path: Path, data: bytes) -> None:
        temporary = path.with_suffix(TMP_SUFFIX)
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(path)
        _fsync_dir(path.parent)

    async def append(self, message: Outgoing) -> None:
        """Store `message` durably (fsync) or raise SpoolError."""
        folder = self.folder
        if not self.writable or folder is None:
            raise SpoolError(f"spool folder {self.root} is not writable")
        data = _encode(message)
        if self._bytes + len(data) > self.max_bytes:
            raise SpoolError(f"spool is full ({self._bytes} of {self.max_bytes} bytes)")
        name = f"{time.time_ns():020d}-{next(self._sequence):08d}{SUFFIX}"
        path = folder / name
        self._bytes += len(data)  # reserve the room before yielding to other appends
        try:
            await asyncio.to_thread(self._write, path, data)
        except OSError as error:
            self._bytes -= len(data)
            raise SpoolError(f"cannot write to spool folder {folder}: {error}") from error
        self._entries[path] = len(data)
        self._update_metrics()
        self._wake.set()

    def _update_metrics(self) -> None:
        metrics.SPOOL_DEPTH.set(self.depth)
        oldest = next(iter(self._entries), None)
        age_s = time.time() - _entry_time_ns(oldest) / 1e9 if oldest else 0.0
        metrics.SPOOL_OLDEST_AGE.set(max(age_s, 0.0))

    # Adopting what gone processes left

    async def adopt(self) -> int:
        """Adopt the spool folders whose owner is gone, and files of the single-folder layout
        left in the root; returns how many spooled files joined this process's spool."""
        try:
            claims, kept = await asyncio.to_thread(
                self._claim_orphans, frozenset(self._held), frozenset(self._kept)
            )
        except OSError as error:
            log.error("spool_adopt_failed", root=str(self.root), error=str(error))
            return 0
        self._kept |= kept
        adopted: list[tuple[Path, int]] = []
        for claim in claims:
            claim.held.pending = len(claim.files)
            self._held[claim.held.folder] = claim.held
            adopted += claim.files
            log.warning("spool_adopted", folder=str(claim.held.folder), depth=len(claim.files))
        if adopted:
            # Rare (a process died), so rebuilding the order from scratch costs nothing.
            merged = sorted([*self._entries.items(), *adopted], key=lambda item: _order(item[0]))
            self._entries = dict(merged)
            self._bytes += sum(size for _, size in adopted)
            self._update_metrics()
            self._wake.set()
        return len(adopted)

    def _claim_orphans(
        self, held: frozenset[Path], kept: frozenset[Path]
    ) -> tuple[list[_Claim], set[Path]]:
        """In a thread: lock every orphaned folder, list its files, remove the empty ones."""
        claims: list[_Claim] = []
        newly_kept: set[Path] = set()
        if not self.root.is_dir():
            return claims, newly_kept
        candidates = [
            path
            for path in sorted(self.root.iterdir())
            if is_owned_folder(path.name) and path not in held and path not in kept
        ]
        if self.root not in held and any(self._spool_files(self.root)):
            candidates.append(self.root)
        for folder in candidates:
            try:
                claim = self._claim(folder)
            except OSError as error:
                log.error("spool_adopt_failed", folder=str(folder), error=str(error))
                continue
            if claim is None:
                continue
            if claim.files:
                claims.append(claim)
            elif not self._release(claim.held):
                newly_kept.add(folder)
        return claims, newly_kept

    @staticmethod
    def _spool_files(folder: Path) -> Iterable[Path]:
        return (p for p in folder.iterdir() if p.suffix in (SUFFIX, TMP_SUFFIX) and p.is_file())

    def _claim(self, folder: Path) -> _Claim | None:
        fd = try_lock(folder)
        if fd is None:
            return None  # its owner is alive (or another ingress adopted it first)
        held = _Held(folder, fd, legacy_root=folder == self.root)
        try:
            files: list[tuple[Path, int]] = []
            for path in sorted(self._spool_files(folder)):
                if path.suffix == TMP_SUFFIX:
                    path.unlink()  # never renamed into place, so never answered 200
                else:
                    files.append((path, path.stat().st_size))
        except BaseException:
            os.close(fd)
            raise
        return _Claim(held, files)

    def _release(self, held: _Held) -> bool:
        """Let go of a drained adopted folder: removed (the root stays), then unlocked.
        False when it was kept for an operator."""
        try:
            return held.legacy_root or self._remove(held)
        finally:
            os.close(held.lock_fd)

    async def _settled(self, path: Path) -> None:
        """`path` left the spool: once an adopted folder has nothing left, let go of it."""
        held = self._held.get(path.parent)
        if held is None or held.own:
            return
        held.pending -= 1
        if held.pending <= 0:
            del self._held[held.folder]
            if not await asyncio.to_thread(self._release, held):
                self._kept.add(held.folder)
            log.info("spool_adopted_drained", folder=str(held.folder))

    # Draining

    async def _drain_forever(self, publisher: Publisher) -> None:
        adopt_at = time.monotonic() + self.adopt_interval_s
        while True:
            if time.monotonic() >= adopt_at:
                await self.adopt()
                adopt_at = time.monotonic() + self.adopt_interval_s
            self._wake.clear()
            try:
                await self.drain(publisher)
            except BrokerUnavailable as error:
                log.warning("spool_drain_paused", error=str(error), depth=self.depth)
                await asyncio.sleep(DRAIN_RETRY_S)
                continue
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # comes as the event is set, and stop() would then wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(adopt_at - time.monotonic(), 0.0)):
                    await self._wake.wait()

    async def drain(self, publisher: Publisher) -> int:
        """Publish every spooled notification in order, deleting each after its confirm."""
        drained = 0
        while self._entries:
            path = next(iter(self._entries))
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError:
                # Taken away by hand: nothing left to send, and nothing behind it must wait.
                self._bytes -= self._entries.pop(path)
                log.error("spool_entry_missing", file=str(path))
                await self._settled(path)
                continue
            try:
                message = _decode(data)
            except (ValueError, KeyError, TypeError) as error:
                # Kept beside the spool for an operator; it cannot block the ones behind it.
                await asyncio.to_thread(path.rename, path.with_suffix(BAD_SUFFIX))
                self._bytes -= self._entries.pop(path)
                log.error("spool_entry_unreadable", file=str(path), error=str(error))
                await self._settled(path)
                continue
            await send(publisher, message)
            await asyncio.to_thread(path.unlink)
            self._bytes -= self._entries.pop(path)
            drained += 1
            self._update_metrics()
            await self._settled(path)
        if drained:
            log.info("spool_drained", count=drained)
        return drained
