"""The PostgreSQL engine (switchboard/store/postgres_engine.py) on a private cluster: a
write is committed whole or not at all, writes run side by side on a bounded pool, a read
can't write, listeners hear of commits only, and opening creates or checks the schema."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import asyncpg
import pytest

from switchboard.store.postgres_engine import Connection, PostgresEngine
from switchboard.store.schema import SCHEMA_VERSION, SchemaMismatch
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)

pytestmark = pytest.mark.postgres

_names = itertools.count()


@pytest.fixture
def database(postgres: Cluster) -> str:
    return postgres.new_database(f"engine_{next(_names)}")


@pytest.fixture
async def engine(database: str) -> AsyncIterator[PostgresEngine]:
    made = PostgresEngine(database, max_connections=4)
    await made.open()
    yield made
    await made.close()


async def _state(conn: Connection, key: str) -> str | None:
    return await conn.fetchval("SELECT value FROM switchboard_state WHERE key = $1", key)


async def test_a_write_is_committed_whole_or_not_at_all(engine: PostgresEngine):
    heard: list[str] = []
    engine.on_write(lambda: heard.append("write"))

    async def both(conn: Connection) -> int:
        await conn.execute("INSERT INTO switchboard_state VALUES ('a', '1')")
        await conn.execute("INSERT INTO switchboard_state VALUES ('b', '2')")
        return 2

    assert await engine.write(both) == 2

    async def half(conn: Connection) -> None:
        await conn.execute("INSERT INTO switchboard_state VALUES ('c', '3')")
        await conn.execute("INSERT INTO switchboard_state VALUES ('a', 'again')")  # taken

    with pytest.raises(asyncpg.UniqueViolationError):
        await engine.write(half)
    assert [await engine.read(lambda c, k=k: _state(c, k)) for k in "abc"] == ["1", "2", None]
    assert heard == ["write"]  # the rolled-back write told nobody


async def test_writes_run_side_by_side_on_a_bounded_pool(engine: PostgresEngine):
    running = peak = 0

    async def slow_insert(conn: Connection, n: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await conn.execute("SELECT pg_sleep(0.3)")
            await conn.execute("INSERT INTO switchboard_state VALUES ($1, 'x')", f"k{n}")
        finally:
            running -= 1

    await asyncio.gather(*(engine.write(lambda c, n=n: slow_insert(c, n)) for n in range(8)))
    # Not one writer at a time, and never more than the pool's four connections.
    assert 2 <= peak <= 4, peak
    assert engine.connections <= 4
    count = await engine.read(lambda c: c.fetchval("SELECT count(*) FROM switchboard_state"))
    assert count == 8


async def test_a_read_cannot_write(engine: PostgresEngine):
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await engine.read(lambda c: c.execute("INSERT INTO switchboard_state VALUES ('r', 'w')"))


async def test_a_statement_past_the_timeout_is_ended(database: str):
    engine = PostgresEngine(database, statement_timeout_s=0.2)
    await engine.open()
    try:
        with pytest.raises((asyncpg.QueryCanceledError, asyncio.TimeoutError)):
            await engine.read(lambda c: c.execute("SELECT pg_sleep(5)"))
        assert await engine.read(lambda c: c.fetchval("SELECT 1")) == 1  # the pool goes on
    finally:
        await engine.close()


async def test_opening_creates_the_schema_once_and_refuses_another_version(database: str):
    first, second = PostgresEngine(database), PostgresEngine(database)
    await asyncio.gather(first.open(), second.open())  # two replicas starting together
    try:
        version = await first.read(lambda c: c.fetchval("SELECT version FROM switchboard_schema"))
        assert version == SCHEMA_VERSION
        await first.write(lambda c: c.execute("UPDATE switchboard_schema SET version = 99"))
    finally:
        await first.close()
        await second.close()
    with pytest.raises(SchemaMismatch, match="schema version 99"):
        await PostgresEngine(database).open()
