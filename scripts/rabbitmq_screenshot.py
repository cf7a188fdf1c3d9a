"""Save a PNG of RabbitMQ's management UI queues page, logged in, with consumer counts shown.

    .venv/bin/python scripts/rabbitmq_screenshot.py http://127.0.0.2:15672 docs/rabbitmq-queues.png

Drives headless Chromium over the DevTools protocol (aiohttp's websocket client): opens the UI,
logs in through its form, turns on the queues page's "Consumer count" column (the UI's own
preference, off by default), shows `#/queues`, waits until the queues named by --expect are
listed, and captures the page. compose-test calls it during its scaled step.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1400,900",
)
START_TIMEOUT_S = 30.0
PAGE_TIMEOUT_S = 30.0
POLL_S = 0.5
# Lets the page draw its last refresh before the capture.
SETTLE_S = 1.0

LOGIN_JS = """
(() => {
  const user = document.querySelector('input[name=username]');
  if (!user) return false;
  user.value = %(user)s;
  document.querySelector('input[name=password]').value = %(password)s;
  document.querySelector('#login form, form').querySelector('input[type=submit]').click();
  return true;
})()
"""


class Page:
    """One browser tab, driven by DevTools protocol commands over its websocket."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result, skipping the events sent meanwhile."""
        ident = next(self.ids)
        await self.socket.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = json.loads(await self.socket.receive_str())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str) -> None:
        """Poll until the expression is truthy, or fail naming `what`."""
        try:
            async with asyncio.timeout(PAGE_TIMEOUT_S):
                while True:
                    if await self.evaluate(expression):
                        return
                    await asyncio.sleep(POLL_S)
        except TimeoutError:
            raise RuntimeError(f"the page never showed {what}") from None


async def debugger_port(profile: Path) -> int:
    """The port Chromium chose for DevTools (it writes it to its profile when listening)."""
    marker = profile / "DevToolsActivePort"
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            text = marker.read_text() if marker.exists() else ""
            if text.strip():
                return int(text.splitlines()[0])
            await asyncio.sleep(POLL_S)


async def capture(url: str, user: str, password: str, expect: list[str]) -> bytes:
    """Log in, show the queues with their consumers, and return the screenshot (PNG)."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        raise RuntimeError(f"no browser: install one of {', '.join(BROWSERS)}")
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped below by its pid
            [browser, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = await debugger_port(Path(profile))
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    tabs = await response.json()
                target = next(tab for tab in tabs if tab.get("type") == "page")
                async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    return await show_queues(Page(ws), url, user, password, expect)
        finally:
            process.terminate()
            process.wait(timeout=10)


async def show_queues(page: Page, url: str, user: str, password: str, expect: list[str]) -> bytes:
    """The steps in the tab: log in, turn the consumers column on, list the queues, capture."""
    await page.call("Page.navigate", url=f"{url.rstrip('/')}/")
    await page.wait_for("!!document.querySelector('input[name=username]')", "its login form")
    login = LOGIN_JS % {"user": json.dumps(user), "password": json.dumps(password)}
    if not await page.evaluate(login):
        raise RuntimeError("no login form")
    await page.wait_for("!!document.querySelector('#logout, #main')", "a logged-in page")
    await page.evaluate("store_pref('column-queues-consumers', 'true'); location.hash = '#/queues'")
    names = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in expect)
    await page.wait_for(
        f"document.body.innerText.includes('Consumers') && {names or 'true'}", "every queue"
    )
    await asyncio.sleep(SETTLE_S)
    shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    return base64.b64decode(shot["data"])


def main(argv: list[str] | None = None) -> int:
    """Capture the queues page; exit 1 with the reason when it cannot."""
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("url", help="the management UI, e.g. http://127.0.0.1:15672")
    cli.add_argument("out", type=Path, help="the PNG to write")
    cli.add_argument("--user", default="guest")
    cli.add_argument("--password", default="guest")
    cli.add_argument("--expect", action="append", default=[], help="a queue name to wait for")
    args = cli.parse_args(argv)
    try:
        png = asyncio.run(capture(args.url, args.user, args.password, args.expect))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(png)
    except (RuntimeError, OSError, aiohttp.ClientError, TimeoutError) as error:
        print(f"rabbitmq_screenshot: {error}", file=sys.stderr)
        return 1
    print(f"{args.out}: {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
