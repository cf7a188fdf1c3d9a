"""The ledger: every voucher's row and journey in PostgreSQL (asyncpg).

Queries live in `queries.sql` under `-- name: x` headers, the schema in `migrations/`, one
ordered file per version. Writes are idempotent in the SQL itself: a journey step is unique by
(message id, stage, attempt, outcome), and a voucher's state only moves to a later step.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import orjson

from shared.errors import SettingsError
from shared.intake import IntakeRequest
from shared.journal import RANKS, Step, changes
from shared.settings import Settings

HERE = Path(__file__).parent
MIGRATIONS_DIR = HERE / "migrations"
UPGRADE_COMMAND = "bridge db upgrade"
# Long enough for a PostgreSQL on the same network; an unreachable one fails start quickly.
CONNECT_TIMEOUT_S = 10.0
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """`-- name: x` headed queries of a SQL file, by name."""
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


QUERIES = load_queries((HERE / "queries.sql").read_text())


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration, in order: `NNNN_name.sql`."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        number, _, name = path.stem.partition("_")
        found.append(Migration(int(number), name, path.read_text()))
    return found


LATEST_VERSION = migrations()[-1].version


def schema_for(namespace: str) -> str:
    """A ledger schema named for a namespace (tests, demos and benchmarks keep one each)."""
    return namespace.replace("-", "_").lower()


def where(settings: Settings) -> str:
    """The database a setting names, for messages: host, port, database; never the password."""
    parts = urlsplit(settings.database_url.get_secret_value())
    return f"{parts.hostname}:{parts.port or 5432}{parts.path} (schema {settings.database_schema})"


def _jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init(connection: asyncpg.Connection) -> None:
    # orjson: every voucher's notification is written as jsonb on the ledger's hot path.
    await connection.set_type_codec(
        "jsonb", encoder=_jsonb, decoder=orjson.loads, schema="pg_catalog"
    )


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A pool on the ledger's database and schema; an unreachable one is a SettingsError."""
    try:
        pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=min_size,
            max_size=max_size,
            timeout=CONNECT_TIMEOUT_S,
            init=_init,
            server_settings={
                "search_path": settings.database_schema,
                "application_name": "voucher-bridge",
            },
        )
    except (OSError, asyncpg.PostgresError, TimeoutError, ValueError) as error:
        raise SettingsError(
            "voucher-bridge cannot start: the ledger's database does not answer\n"
            f"  BRIDGE_DATABASE_URL: {where(settings)}: {type(error).__name__}: {error}"
        ) from error
    assert pool is not None
    return pool


def _value(facts: dict[str, Any], key: str, kind: type) -> Any:
    value = facts.get(key)
    if value is None:
        return None
    if kind is datetime:
        return datetime.fromisoformat(value) if isinstance(value, str) else value
    if kind is Decimal:
        return Decimal(str(value))
    if kind is dict:
        return value
    return kind(value)


class Ledger:
    """The ledger's reads and writes, on a pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, **pool_options: Any) -> AsyncIterator[Ledger]:
        """A ledger whose schema is the latest; refuses an older one, naming the command."""
        pool = await create_pool(settings, **pool_options)
        try:
            ledger = cls(pool)
            await ledger.check_schema(settings)
            yield ledger
        finally:
            await pool.close()

    async def version(self) -> int:
        async with self.pool.acquire() as connection:
            exists = await connection.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            if not exists:
                return 0
            version: int = await connection.fetchval(QUERIES["schema_version"])
            return version

    async def check_schema(self, settings: Settings) -> None:
        version = await self.version()
        if version < LATEST_VERSION:
            raise SettingsError(
                f"voucher-bridge cannot start: the ledger at {where(settings)} is at schema "
                f"version {version}, this code needs {LATEST_VERSION}: run `{UPGRADE_COMMAND}`"
            )
        if version > LATEST_VERSION:
            raise SettingsError(
                f"voucher-bridge cannot start: the ledger at {where(settings)} is at schema "
                f"version {version}, newer than this code knows ({LATEST_VERSION}): "
                "run a newer voucher-bridge"
            )

    async def upgrade(self, schema: str) -> list[Migration]:
        """Apply the migrations not applied yet, each in its own transaction; returns them."""
        applied = []
        async with self.pool.acquire() as connection:
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in migrations():
                async with connection.transaction():
                    # Two upgrades at once: the second waits here, then finds it applied.
                    await connection.execute("LOCK TABLE schema_version IN EXCLUSIVE MODE")
                    done = await connection.fetchval(
                        "SELECT 1 FROM schema_version WHERE version = $1", migration.version
                    )
                    if done:
                        continue
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                    applied.append(migration)
        return applied

    async def record(self, steps: Sequence[Step]) -> None:
        """Write a batch of steps and what they change on each voucher, in one transaction."""
        if not steps:
            return
        rows = changes(steps)
        journey = (
            [s.voucher_id for s in steps],
            [s.message_id for s in steps],
            [s.stage for s in steps],
            [s.attempt for s in steps],
            [s.outcome for s in steps],
            [s.at for s in steps],
            [s.detail for s in steps],
            [s.request_id for s in steps],
        )
        f = [c.facts for c in rows]
        vouchers = (
            [c.voucher_id for c in rows],
            [_value(x, "coupon_id", str) for x in f],
            [_value(x, "location_id", str) for x in f],
            [_value(x, "request_id", str) for x in f],
            [_value(x, "amount_cents", int) for x in f],
            [_value(x, "jackpot_value", Decimal) for x in f],
            [_value(x, "jackpot_price", Decimal) for x in f],
            [_value(x, "jackpot_state", str) for x in f],
            [str(c.state) if c.state else None for c in rows],
            [c.state_at for c in rows],
            [RANKS[c.state] if c.state else None for c in rows],
            [_value(x, "validity_date", datetime) for x in f],
            [_value(x, "resa_expire_date", datetime) for x in f],
            [_value(x, "pdf_path", str) for x in f],
            [_value(x, "pdf_bytes", int) for x in f],
            [_value(x, "doshii_status", str) for x in f],
            [_value(x, "notification", dict) for x in f],
            [c.first_seen for c in rows],
            [c.last_change for c in rows],
        )
        paying = [(c.voucher_id, c.facts["request_id"]) for c in rows if c.facts.get("request_id")]
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(QUERIES["insert_steps"], *journey)
            if rows:
                await connection.execute(QUERIES["upsert_vouchers"], *vouchers)
            if paying:
                await connection.execute(
                    QUERIES["link_requests"], [v for v, _ in paying], [r for _, r in paying]
                )

    async def find(self, ident: str) -> list[asyncpg.Record]:
        """Vouchers by voucher id, coupon id or Doshii request id."""
        async with self.pool.acquire() as connection:
            rows: list[asyncpg.Record] = await connection.fetch(QUERIES["find_vouchers"], ident)
            return rows

    async def journey(
        self, voucher_id: UUID, request_id: str | None = None
    ) -> list[asyncpg.Record]:
        """A voucher's steps, and its request's from before the voucher (when named)."""
        async with self.pool.acquire() as connection:
            rows: list[asyncpg.Record] = await connection.fetch(
                QUERIES["journey_of"], voucher_id, request_id
            )
            return rows

    async def claim_request(self, request: IntakeRequest) -> tuple[asyncpg.Record, bool]:
        """Claim a till's request: its row, and whether this call made the claim."""
        async with self.pool.acquire() as connection:
            row: asyncpg.Record | None = await connection.fetchrow(
                QUERIES["claim_request"],
                request.request_id,
                request.location_id,
                request.amount_cents,
                request.pos_terminal_id,
                request.card_ref_hash,
                request.card_ref_last4,
                request.received_at,
            )
            if row is not None:
                return row, True
            row = await connection.fetchrow(QUERIES["find_request"], request.request_id)
            assert row is not None
            return row, False

    async def settle_request(
        self, request_id: str, state: str, voucher_id: UUID | None, reason: str | None
    ) -> None:
        async with self.pool.acquire() as connection:
            await connection.execute(
                QUERIES["settle_request"], request_id, state, voucher_id, reason
            )

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of a named query."""
        async with self.pool.acquire() as connection:
            rows: list[asyncpg.Record] = await connection.fetch(QUERIES[query], *args)
            return rows

    async def execute(self, query: str, *args: Any) -> None:
        async with self.pool.acquire() as connection:
            await connection.execute(QUERIES[query], *args)
