"""The PostgreSQL engine under a store, as sqlite_engine.py is under the SQLite
store: connections and transactions, nothing of jobs. Not yet used by a store a user can
start (tests/test_postgres_engine.py checks it on a private cluster).

The driver is asyncpg (chosen by bench/pg_driver.py: docs/performance.md, "PostgreSQL
driver"). A bounded pool of connections serves every request; `write` runs a function of
a connection inside a transaction and returns once it is committed, so whatever a caller
acknowledges on the strength of it is durable (with the server's synchronous_commit, on by
default). Unlike SQLite's one writer, writes run side by side: row locks (and
`FOR UPDATE SKIP LOCKED` where writers would race for the same row) keep them apart.
`read` runs in a read-only transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from switchboard.store.postgres_migrations import apply_schema

T = TypeVar("T")
# What a request's function gets: a pooled connection (generic in asyncpg's stubs only).
if TYPE_CHECKING:
    Connection: TypeAlias = PoolConnectionProxy[Any]
else:
    Connection = PoolConnectionProxy


async def reach(dsn: str, *, upgrade: bool = False) -> None:
    """Connect to `dsn` and create or check the schema there (with `upgrade`, bring an
    older one up to date: store/postgres_migrations.py), then let go: before serving, so a
    wrong URI or an unreachable server is said at once. Raises OSError,
    asyncpg.PostgresError, asyncpg.InterfaceError, ValueError (a malformed URI),
    SchemaMismatch."""
    engine = PostgresEngine(dsn, min_connections=1, max_connections=1, upgrade=upgrade)
    await engine.open()
    await engine.close()


def affected(status: str) -> int:
    """The rows a statement changed, from its command status ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1])


async def _keep_session(conn: Any) -> None:
    """What a connection needs back in the pool: nothing. asyncpg's default reset (advisory
    unlock, UNLISTEN, RESET ALL) is a round trip at every release, for session state the
    store never leaves: its locks are transaction-scoped, it sets nothing, and it LISTENs
    on a connection of its own. A connection that broke mid-transaction is dropped by the
    pool, and `transaction()` rolls back what failed."""


class PostgresEngine:
    """One database: `dsn` is a libpq URI. `max_connections` bounds the pool (a request
    beyond it waits for a connection); `statement_timeout_s` ends any one statement that
    runs longer, so a stuck query can't hold a connection forever; `idle_in_transaction_s`
    ends (on the server) the session of a transaction left waiting that long for its next
    statement, so a process paused or cut off in the middle of one can't hold its locks
    (the lease row's, a supervisor's row) for as long as it is gone. `upgrade`: bring a
    database an older release made up to this one's schema as it opens."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        statement_timeout_s: float = 30.0,
        idle_in_transaction_s: float = 5.0,
        upgrade: bool = False,
    ) -> None:
        self.dsn = dsn
        self._upgrade = upgrade
        self._min = min_connections
        self._max = max_connections
        self._timeout = statement_timeout_s
        self._idle_in_transaction = idle_in_transaction_s
        self._pool: asyncpg.Pool[Any] | None = None
        #: Called after each write has committed (the live feed wakes on them).
        self._write_listeners: list[Callable[[], None]] = []

    async def open(self) -> None:
        """Create the schema or check its version (store/postgres_migrations), then connect
        the pool. The schema is made on a connection of its own, without the pool's
        statement timeout: creating it may take longer than any one request should."""
        conn = await asyncpg.connect(self.dsn)
        try:
            await apply_schema(conn, self.dsn, upgrade=self._upgrade)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._min,
            max_size=self._max,
            command_timeout=self._timeout,
            server_settings={
                "statement_timeout": str(int(self._timeout * 1000)),
                "idle_in_transaction_session_timeout": str(
                    max(1, int(self._idle_in_transaction * 1000))
                ),
            },
            reset=_keep_session,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def write(self, fn: Callable[[Connection], Awaitable[T]], *, quiet: bool = False) -> T:
        """Run `fn` in a transaction; its value once committed (its error, rolled back).
        `quiet`: a write no reader of jobs cares about (the replicas' lease and liveness),
        which wakes no write listener."""
        assert self._pool is not None, "store is not open"
        async with self._pool.acquire() as conn, conn.transaction():
            value = await fn(conn)
        if not quiet:
            for listener in self._write_listeners:
                listener()
        return value

    async def read(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `fn` in a read-only transaction (one snapshot for all its statements)."""
        assert self._pool is not None, "store is not open"
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await fn(conn)

    def on_write(self, listener: Callable[[], None]) -> None:
        self._write_listeners.append(listener)

    @property
    def connections(self) -> int:
        """Connections the pool holds now (open, idle or in use)."""
        assert self._pool is not None, "store is not open"
        return self._pool.get_size()
