"""`bridge`: the one command for the ingress, the workers, keys, dead letters and the sandboxes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog
from pydantic import SecretStr

from sandbox.server import (
    DEFAULT_DOSHII_CLIENT_ID,
    DEFAULT_DOSHII_CLIENT_SECRET,
    DEFAULT_JACKPOT_API_KEY,
    DEFAULT_JACKPOT_API_SIGNATURE,
    DEFAULT_JACKPOT_CLIENT_ID,
    Sandboxes,
)
from sandbox.till import SALE_WAIT_S
from shared import logs
from shared.errors import BrokerCertificateError, BrokerUnavailable, SettingsError
from shared.journal import State
from shared.settings import Settings, load_settings
from workers.main import ROLES

DEFAULT_TILL_CENTS = 2500


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from error
    logs.configure(settings.log_level, json=settings.log_json)
    return settings


def _serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]) -> int:
    """Run `main` as a service; a broker that cannot be used, or a setting found bad only once
    it runs (the ledger's database away, its schema old), ends it with its reason, exit 2."""
    from shared.service import run

    try:
        return run(main)
    except (BrokerCertificateError, BrokerUnavailable) as error:
        print(f"bridge: cannot use the broker: {error}", file=sys.stderr)
        return 2
    except SettingsError as error:
        print(error, file=sys.stderr)
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


def _db(args: argparse.Namespace) -> int:
    """`bridge db upgrade`: bring the ledger's schema to this code's version."""
    settings = _settings()
    from shared.ledger import Ledger, create_pool, where

    async def main(stop: asyncio.Event) -> int:
        pool = await create_pool(settings, max_size=1)
        try:
            applied = await Ledger(pool).upgrade(settings.database_schema)
            version = await Ledger(pool).version()
        finally:
            await pool.close()
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
        print(f"the ledger at {where(settings)} is at schema version {version}")
        return 0

    return _serve(main)


def _status(args: argparse.Namespace) -> int:
    settings = _settings()
    from bridge import status

    return _serve(lambda stop: status.status(settings, args.id, as_json_lines=args.json))


def _vouchers(args: argparse.Namespace) -> int:
    settings = _settings()
    from bridge import status

    return _serve(
        lambda stop: status.vouchers(
            settings,
            state=args.state,
            stuck=args.stuck,
            since=args.since,
            json_lines=args.json,
            limit=args.limit,
        )
    )


def _duration(text: str) -> timedelta:
    from bridge.status import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


def _till_auth(args: argparse.Namespace) -> SecretStr | None:
    """The `key:token` the till's webhook carries: the first of BRIDGE_DOSHII_WEBHOOK_AUTH."""
    if not args.till:
        return None
    from shared.settings import parse_webhook_auth

    try:
        pairs = parse_webhook_auth(os.environ.get("BRIDGE_DOSHII_WEBHOOK_AUTH", ""))
    except ValueError as error:
        print(f"bridge sandbox --till: BRIDGE_DOSHII_WEBHOOK_AUTH: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    if not pairs:
        print(
            "bridge sandbox --till: BRIDGE_DOSHII_WEBHOOK_AUTH: is missing; the till's webhook "
            "carries its first key:token, as the ingress expects",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return pairs[0]


def _notification_url(args: argparse.Namespace) -> str | None:
    """Where the Jackpot sandbox notifies: as given, else the --till ingress's Jackpot route."""
    if args.jackpot_notification_url or not args.till:
        return str(args.jackpot_notification_url) if args.jackpot_notification_url else None
    from ingress.app import NOTIFICATION_PATH

    parts = urlsplit(args.till)
    return f"{parts.scheme}://{parts.netloc}{NOTIFICATION_PATH}"


def _sandbox(args: argparse.Namespace) -> int:
    """Serve both sandboxes until SIGTERM; with --story, tell stories against the ingress."""
    from sandbox.server import run_forever
    from sandbox.story import tell_stories
    from sandbox.till import sell_at_till, webhook_of
    from shared.service import run

    if args.story_repeat_s and not args.story:
        print("bridge sandbox: --story-repeat-s needs --story", file=sys.stderr)
        return 2
    till_options = (args.till_sales, args.till_amount_cents, args.till_wait_s)
    if not args.till and till_options != (1, DEFAULT_TILL_CENTS, SALE_WAIT_S):
        print("bridge sandbox: the --till-* options need --till", file=sys.stderr)
        return 2
    settings = _story_settings(args) if args.story else None
    till_auth = _till_auth(args)
    logs.configure("info")

    async def main(stop: asyncio.Event) -> int:
        """Serve until `stop`, or until serving fails (exit status 1, say a port in use)."""
        stories: list[asyncio.Task[None]] = []

        def started(sandboxes: Sandboxes) -> None:
            """Once the sandboxes answer: start telling stories, if asked to."""
            if settings is not None:
                story = tell_stories(sandboxes, settings, args.story, repeat_s=args.story_repeat_s)
                stories.append(asyncio.create_task(story))
            if till_auth is not None:
                till = sell_at_till(
                    sandboxes,
                    webhook_of(args.till, till_auth),
                    sales=args.till_sales,
                    amount_cents=args.till_amount_cents,
                    wait_s=args.till_wait_s,
                )
                stories.append(asyncio.create_task(_without_result(till)))

        serving = asyncio.create_task(
            run_forever(
                args.host,
                args.jackpot_port,
                args.doshii_port,
                args.jackpot_api_key,
                args.doshii_client_id,
                args.doshii_client_secret,
                jackpot_api_signature=args.jackpot_api_signature,
                jackpot_client_id=args.jackpot_client_id,
                jackpot_notification_url=_notification_url(args),
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


async def _without_result(work: Coroutine[Any, Any, object]) -> None:
    """Run `work` as one of the sandbox's background tasks, which give nothing back."""
    await work


def _ingress_url(text: str) -> str:
    """An `http(s)://host[:port]` URL, without a trailing slash."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s)://host[:port] URL")
    return text.rstrip("/")


def _positive(text: str) -> int:
    """A whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


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

    db = commands.add_parser("db", help="the ledger's database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser(
        "upgrade", help="apply the ledger's migrations (the one step before first start)"
    ).set_defaults(func=_db)

    status = commands.add_parser("status", help="where a voucher is, and its journey")
    status.add_argument("id", help="a voucher id, coupon id or Doshii request id")
    status.add_argument("--json", action="store_true", help="one JSON object per voucher")
    status.set_defaults(func=_status)

    vouchers = commands.add_parser("vouchers", help="list vouchers from the ledger")
    vouchers.add_argument("--state", choices=[str(s) for s in State], help="only in this state")
    vouchers.add_argument(
        "--stuck", action="store_true", help="only those that need an operator or have not moved"
    )
    vouchers.add_argument(
        "--since", type=_duration, help="only those changed within this long: 90s, 15m, 2h, 7d"
    )
    vouchers.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    vouchers.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    vouchers.set_defaults(func=_vouchers)

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
    sandbox.add_argument("--jackpot-api-signature", default=DEFAULT_JACKPOT_API_SIGNATURE)
    sandbox.add_argument("--jackpot-client-id", default=DEFAULT_JACKPOT_CLIENT_ID)
    sandbox.add_argument(
        "--jackpot-notification-url",
        metavar="URL",
        type=_ingress_url,
        help="where Jackpot notifies vouchers reserved through a session (its "
        "reserveNotificationUrl); with --till, defaults to that ingress's Jackpot route",
    )
    sandbox.add_argument(
        "--till",
        metavar="WEBHOOK_URL",
        type=_ingress_url,
        help="once up, register WEBHOOK_URL (the ingress's /notifications/doshii) for "
        "card_activate with the first key:token of BRIDGE_DOSHII_WEBHOOK_AUTH, sell cards at "
        "the till and log how each ended; keeps serving afterwards",
    )
    sandbox.add_argument(
        "--till-sales", metavar="N", type=_positive, default=1, help="with --till: cards to sell"
    )
    sandbox.add_argument(
        "--till-amount-cents",
        metavar="CENTS",
        type=_positive,
        default=DEFAULT_TILL_CENTS,
        help=f"with --till: each card's amount (default {DEFAULT_TILL_CENTS})",
    )
    sandbox.add_argument(
        "--till-wait-s",
        metavar="S",
        type=_seconds,
        default=SALE_WAIT_S,
        help=f"with --till: how long each sale may take to end (default {SALE_WAIT_S:g})",
    )
    sandbox.set_defaults(func=_sandbox)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
