"""Run a reference server of ../shared/anchors against another broker, its code unchanged.

`python -m bench.anchor_on URL ANCHOR.py PORT`: the anchors hard-code the broker on 5672; this
points their aio_pika.connect/connect_robust calls at URL (a cluster node) and runs the file as
__main__ with PORT as its argument, so the same reference code is measured on the cluster.
"""

from __future__ import annotations

import functools
import runpy
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika


def _pointed(connect: Callable[..., Awaitable[Any]], url: str) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(connect)
    async def wrapper(_url: Any = None, *args: Any, **kwargs: Any) -> Any:
        return await connect(url, *args, **kwargs)

    return wrapper


def main(argv: list[str]) -> None:
    """Patch the connect functions to `url`, then run the anchor file with its port."""
    url, anchor, port = argv
    aio_pika.connect = _pointed(aio_pika.connect, url)  # type: ignore[assignment]
    aio_pika.connect_robust = _pointed(aio_pika.connect_robust, url)  # type: ignore[assignment]
    sys.argv = [anchor, port]
    runpy.run_path(anchor, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
