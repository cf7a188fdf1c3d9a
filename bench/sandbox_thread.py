"""Both sandboxes served from a thread of their own, on an event loop of their own.

The pipeline benchmark's load driver hosts the sandboxes so it reads their state directly (the
same clock, no control-route HTTP in the way), yet their CPU is read apart from the driver's:
the thread's native id names /proc/PID/task/TID/stat.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from sandbox.server import Sandboxes, start_sandboxes

_T = TypeVar("_T")

THREAD_NAME = "sandboxes"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class SandboxThread:
    """`start()` serves both sandboxes on `host` from a new thread; `stop()` ends it."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._started: concurrent.futures.Future[Sandboxes] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name=THREAD_NAME, daemon=True)
        self._native_id: int | None = None

    @property
    def native_id(self) -> int:
        """The kernel's id of the serving thread (its /proc/PID/task/TID)."""
        if self._native_id is None:
            raise RuntimeError("the sandbox thread is not running")
        return self._native_id

    def start(self) -> Sandboxes:
        """Start the thread and wait until both sandboxes listen; returns them."""
        self._thread.start()
        return self._started.result(timeout=START_TIMEOUT_S)

    def _serve(self) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        try:
            sandboxes = await start_sandboxes(self._host)
        except Exception as error:
            self._started.set_exception(error)
            return
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._native_id = threading.get_native_id()
        self._started.set_result(sandboxes)
        try:
            await self._stop.wait()
        finally:
            await sandboxes.close()

    async def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` on the sandboxes' loop and await its result from the caller's loop."""
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the sandbox thread is not running")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        """Close both sandboxes and end the thread (bounded by STOP_TIMEOUT_S)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
