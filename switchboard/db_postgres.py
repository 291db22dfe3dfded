"""`switchboard db version|upgrade --database URI`: a PostgreSQL database's schema version,
and its upgrade to this release's (store/postgres_migrations.py), worked on directly."""

from __future__ import annotations

import asyncio

import asyncpg

from switchboard.store.postgres_migrations import apply_schema, schema_version
from switchboard.store.schema import SCHEMA_VERSION, SchemaMismatch
from switchboard.store.uri import shown_uri

#: What reaching a database may raise: a message, not a trace.
REACH_ERRORS = (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def _version(dsn: str) -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await schema_version(conn)
    finally:
        await conn.close()


def postgres_version(dsn: str) -> int | None:
    """The schema version of the database `dsn` names, read without changing it (None:
    no switchboard schema in it). Stops with one line if it can't be reached."""
    try:
        return asyncio.run(_version(dsn))
    except REACH_ERRORS as exc:
        raise SystemExit(f"switchboard: cannot read {shown_uri(dsn)}: {exc}") from None


async def _upgrade(dsn: str) -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        before = await schema_version(conn)
        if before is not None and before != SCHEMA_VERSION:
            await apply_schema(conn, dsn, upgrade=True)
        return before
    finally:
        await conn.close()


def upgrade_postgres(dsn: str) -> int:
    """Upgrade the database `dsn` names to this release's schema; the version it had.
    Stops with one line saying what is wrong (no schema there, a newer one, replicas
    serving it, the server's error)."""
    try:
        before = asyncio.run(_upgrade(dsn))
    except SchemaMismatch as exc:
        raise SystemExit(f"switchboard: {exc}") from None
    except REACH_ERRORS as exc:
        raise SystemExit(f"switchboard: cannot upgrade {shown_uri(dsn)}: {exc}") from None
    if before is None:
        raise SystemExit(
            f"switchboard: no switchboard schema in {shown_uri(dsn)}: nothing to upgrade"
            " (`switchboard serve --database` creates it in an empty database)"
        )
    return before
