"""The PostgreSQL schema (switchboard/store/postgres_schema.py) on a private cluster: the
tables, columns, indexes and triggers of the SQLite baseline, the triggers doing what
SQLite's do, and the version check."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from switchboard.store.migrations import MIGRATIONS
from switchboard.store.migrations import apply_schema as sqlite_schema
from switchboard.store.postgres_migrations import apply_schema
from switchboard.store.postgres_schema import MIGRATIONS as PG_MIGRATIONS
from switchboard.store.postgres_schema import POSTGRES_BASELINE
from switchboard.store.schema import BASELINE_VERSION, SCHEMA_VERSION, SchemaMismatch
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)

pytestmark = pytest.mark.postgres

_names = itertools.count()


@pytest.fixture
async def database(postgres: Cluster) -> str:
    """A new database of this test's own: its URI."""
    return postgres.new_database(f"schema_{next(_names)}")


@pytest.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database)
    await apply_schema(connection, database)
    yield connection
    await connection.close()


def _sqlite_shape(tmp_path: Path) -> tuple[dict[str, set[str]], set[str], set[str]]:
    """The SQLite baseline's tables with their columns, its indexes and its triggers."""
    db = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    sqlite_schema(db)
    tables = {
        name: {row[1] for row in db.execute(f"PRAGMA table_info({name})")}
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    index = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    triggers = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    db.close()
    # SQLite names the indexes behind UNIQUE and PRIMARY KEY constraints itself.
    return tables, {n for n in index if not n.startswith("sqlite_autoindex")}, triggers


async def test_the_tables_columns_indexes_and_triggers_are_sqlite_s(conn, tmp_path):
    tables, indexes, triggers = _sqlite_shape(tmp_path)
    columns: dict[str, set[str]] = {}
    for table, column in await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public'"
    ):
        columns.setdefault(table, set()).add(column)
    assert columns.pop("switchboard_schema") == {"version", "only_row"}  # user_version
    # Artifact bytes: files beside an SQLite database, chunks in a PostgreSQL one.
    assert columns.pop("artifact_chunks") == {"digest", "seq", "data"}
    assert columns == tables
    own_indexes = (  # not those behind a constraint (primary keys, UNIQUE)
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relnamespace = 'public'::regnamespace"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
    )
    pg_indexes = {r["relname"] for r in await conn.fetch(own_indexes)}
    assert pg_indexes == indexes
    user_triggers = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
    pg_triggers = {r["tgname"] for r in await conn.fetch(user_triggers)}
    assert pg_triggers == triggers


async def _job(conn: asyncpg.Connection, job_id: str) -> None:
    await conn.execute(
        "INSERT INTO jobs (id, name, spec, phase, queued_at, created_at, updated_at)"
        " VALUES ($1, 'j', '\\x7b7d', 'queued', 0, 0, 0)",
        job_id,
    )
    await conn.execute("INSERT INTO job_secrets (job_id, sealed) VALUES ($1, '\\x00')", job_id)


async def test_job_changes_are_logged_and_secrets_dropped_as_sqlite_s_triggers_do(conn):
    await _job(conn, "ends")
    await _job(conn, "goes")
    await conn.execute("UPDATE jobs SET updated_at = 1 WHERE id = 'ends'")  # not listed
    await conn.execute("UPDATE jobs SET phase = 'running' WHERE id = 'ends'")
    assert await conn.fetchval("SELECT count(*) FROM job_secrets") == 2
    await conn.execute("UPDATE jobs SET phase = 'succeeded' WHERE id = 'ends'")
    await conn.execute("DELETE FROM jobs WHERE id = 'goes'")
    changes = await conn.fetch("SELECT job_id, deleted FROM job_changes ORDER BY rev")
    assert [tuple(c) for c in changes] == [
        ("ends", 0),
        ("goes", 0),
        ("ends", 0),
        ("ends", 0),
        ("goes", 1),
    ]
    assert await conn.fetchval("SELECT count(*) FROM job_secrets") == 0
    # The identity columns number rows as SQLite's rowids did.
    assert [r["seq"] for r in await conn.fetch("SELECT seq FROM jobs")] == [1]


async def test_the_version_is_recorded_and_checked(database):
    assert POSTGRES_BASELINE == BASELINE_VERSION
    # Each SQLite step has its PostgreSQL twin, in the same order.
    assert [to for to, _ in PG_MIGRATIONS] == [m.to for m in MIGRATIONS]
    assert BASELINE_VERSION + len(PG_MIGRATIONS) == SCHEMA_VERSION
    first, second = await asyncpg.connect(database), await asyncpg.connect(database)
    try:
        # Two switchboards starting at once: one creates the schema, the other finds it.
        await asyncio.gather(apply_schema(first, database), apply_schema(second, database))
        assert await first.fetchval("SELECT version FROM switchboard_schema") == SCHEMA_VERSION
        await first.execute("UPDATE switchboard_schema SET version = version + 1")
        with pytest.raises(SchemaMismatch, match=f"schema version {SCHEMA_VERSION + 1}"):
            await apply_schema(second, database)
    finally:
        await first.close()
        await second.close()
