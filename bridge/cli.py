"""`bridge`: the one command for the ingress, the workers, keys, dead letters and the sandboxes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit

import structlog

from sandbox.server import (
    DEFAULT_DOSHII_CLIENT_ID,
    DEFAULT_DOSHII_CLIENT_SECRET,
    DEFAULT_JACKPOT_API_KEY,
    Sandboxes,
)
from shared import logs
from shared.errors import BrokerCertificateError, BrokerUnavailable, SettingsError
from shared.settings import Settings, load_settings

ROLES = ("reservations", "pdfs", "lifecycle", "doshii", "all")


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from error
    logs.configure(settings.log_level, json=settings.log_json)
    return settings


def _serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]) -> int:
    """Run `main` as a service; a broker that cannot be used ends it with its reason, exit 2."""
    from shared.service import run

    try:
        return run(main)
    except (BrokerCertificateError, BrokerUnavailable) as error:
        print(f"bridge: cannot use the broker: {error}", file=sys.stderr)
        return 2


def _ingress(args: argparse.Namespace) -> int:
    settings = _settings()
    from ingress.app import create_app
    from shared.service import start_site

    async def main(stop: asyncio.Event) -> None:
        runner, port = await start_site(
            create_app(settings),
            settings.http_host,
            settings.http_port,
            shutdown_timeout_s=settings.drain_timeout_s,
        )
        structlog.get_logger("ingress").info("listening", host=settings.http_host, port=port)
        await stop.wait()
        await runner.cleanup()

    return _serve(main)


def _checked(settings: Settings, role: str) -> None:
    from workers.main import check_settings

    try:
        check_settings(settings, role)
    except SettingsError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from error


def _worker(args: argparse.Namespace) -> int:
    settings = _settings()
    _checked(settings, args.role)
    from workers.main import serve_workers

    return _serve(lambda stop: serve_workers(settings, args.role, stop, drain=args.drain))


def _run_all(args: argparse.Namespace) -> int:
    settings = _settings()
    _checked(settings, "all")
    from workers.main import serve_everything

    return _serve(lambda stop: serve_everything(settings, stop))


def _mint(args: argparse.Namespace) -> int:
    settings = _settings()
    from shared.keys import KeyRing
    from shared.models import KeyClaims

    claims = KeyClaims(
        location_id=args.location, request_id=args.request, amount_cents=args.amount_cents
    )
    print(KeyRing(settings.key_secrets).mint(claims))
    return 0


def _dlq(args: argparse.Namespace) -> int:
    settings = _settings()
    from workers import dlq

    return _serve(lambda stop: dlq.command(settings, args))


def _story_settings(args: argparse.Namespace) -> Settings:
    """The settings `--story` mints keys with (BRIDGE_KEY_SECRETS) and converts values with.

    The partner credentials the settings require are this sandbox's own: the story never uses
    them, so only BRIDGE_KEY_SECRETS (and BRIDGE_VALUE_TO_CENTS) need to be in the environment.
    """
    try:
        return load_settings(
            jackpot_api_key=args.jackpot_api_key,
            doshii_client_id=args.doshii_client_id,
            doshii_client_secret=args.doshii_client_secret,
        )
    except SettingsError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from error


def _sandbox(args: argparse.Namespace) -> int:
    """Serve both sandboxes until SIGTERM; with --story, tell stories against the ingress."""
    from sandbox.server import run_forever
    from sandbox.story import tell_stories
    from shared.service import run

    if args.story_repeat_s and not args.story:
        print("bridge sandbox: --story-repeat-s needs --story", file=sys.stderr)
        return 2
    settings = _story_settings(args) if args.story else None
    logs.configure("info")

    async def main(stop: asyncio.Event) -> int:
        """Serve until `stop`, or until serving fails (exit status 1, say a port in use)."""
        stories: list[asyncio.Task[None]] = []

        def started(sandboxes: Sandboxes) -> None:
            """Once the sandboxes answer: start telling stories, if asked to."""
            if settings is not None:
                story = tell_stories(sandboxes, settings, args.story, repeat_s=args.story_repeat_s)
                stories.append(asyncio.create_task(story))

        serving = asyncio.create_task(
            run_forever(
                args.host,
                args.jackpot_port,
                args.doshii_port,
                args.jackpot_api_key,
                args.doshii_client_id,
                args.doshii_client_secret,
                on_started=started,
            )
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((serving, stopping), return_when=asyncio.FIRST_COMPLETED)
        # Stories first: they play against the sandboxes, which stop next.
        for task in (*stories, stopping):
            task.cancel()
        await asyncio.gather(*stories, stopping, return_exceptions=True)
        if serving.done():
            error = serving.exception()
            if error is not None:
                print(f"bridge sandbox: {type(error).__name__}: {error}", file=sys.stderr)
                return 1
            return 0
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        return 0

    return run(main)


def _ingress_url(text: str) -> str:
    """An `http(s)://host[:port]` URL, without a trailing slash."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s)://host[:port] URL")
    return text.rstrip("/")


def _seconds(text: str) -> float:
    """A number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be 0 or more")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bridge", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    commands.add_parser("ingress", help="serve Jackpot's notifications").set_defaults(func=_ingress)

    worker = commands.add_parser("worker", help="consume one stage's queue, or all of them")
    worker.add_argument("role", choices=ROLES)
    worker.add_argument(
        "--drain", action="store_true", help="process until the queues are empty, then exit"
    )
    worker.set_defaults(func=_worker)

    commands.add_parser("run", help="the ingress and every worker in one process").set_defaults(
        func=_run_all
    )

    key = commands.add_parser("key", help="notificationKeys")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    mint = key_commands.add_parser("mint", help="print a key for a Doshii activation request")
    mint.add_argument("--location", required=True, help="Doshii location id")
    mint.add_argument("--request", required=True, help="Doshii activation request id")
    mint.add_argument("--amount-cents", required=True, type=int, help="requested amount in cents")
    mint.set_defaults(func=_mint)

    dlq = commands.add_parser("dlq", help="dead letters: list, replay, purge")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_commands.add_parser("list", help="show every dead letter with its reason").set_defaults(
        func=_dlq
    )
    replay = dlq_commands.add_parser("replay", help="send dead letters back to their queue")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter")
    which.add_argument("id", nargs="?", help="a message id (<voucherId>:<state>) from `dlq list`")
    replay.set_defaults(func=_dlq)
    purge = dlq_commands.add_parser("purge", help="delete every dead letter")
    purge.add_argument("--yes", action="store_true", help="do not ask")
    purge.set_defaults(func=_dlq)

    sandbox = commands.add_parser("sandbox", help="serve the Jackpot and Doshii sandboxes")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--jackpot-port", type=int, default=8091)
    sandbox.add_argument("--doshii-port", type=int, default=8092)
    sandbox.add_argument("--jackpot-api-key", default=DEFAULT_JACKPOT_API_KEY)
    sandbox.add_argument("--doshii-client-id", default=DEFAULT_DOSHII_CLIENT_ID)
    sandbox.add_argument("--doshii-client-secret", default=DEFAULT_DOSHII_CLIENT_SECRET)
    sandbox.add_argument(
        "--story",
        metavar="INGRESS_URL",
        type=_ingress_url,
        help="once up, wait for INGRESS_URL/readyz, then play the demo's vouchers against it and "
        "log how each ended (keys minted with BRIDGE_KEY_SECRETS); keeps serving afterwards",
    )
    sandbox.add_argument(
        "--story-repeat-s",
        metavar="N",
        type=_seconds,
        default=0.0,
        help="with --story: play a fresh story every N seconds (default 0: once)",
    )
    sandbox.set_defaults(func=_sandbox)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
