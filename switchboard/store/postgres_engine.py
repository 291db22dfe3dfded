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

Behind a pooler in transaction mode (PgBouncer's `pool_mode = transaction`, `pooled`), a
client's consecutive transactions may run on different server sessions, so nothing may
outlive one: no named prepared statements (asyncpg's statement cache is off: each
statement is parsed again, unnamed, inside its transaction), no startup parameters (the
pooler refuses or drops them), so the two timeouts are set with SET LOCAL in the same
message as each transaction's BEGIN (no round trip more), and the schema is checked or
created in one transaction under a transaction-scoped advisory lock
(store/postgres_migrations.py). Without `pooled`, a connection whose session settings do
not hold (a pooler that dropped them) is refused at open, naming the setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from switchboard.store.postgres_migrations import apply_schema
from switchboard.store.schema import SchemaMismatch
from switchboard.store.uri import shown_uri

T = TypeVar("T")
# What a request's function gets: a pooled connection (generic in asyncpg's stubs only).
if TYPE_CHECKING:
    Connection: TypeAlias = PoolConnectionProxy[Any]
else:
    Connection = PoolConnectionProxy


#: What the hint at a pooler says to do.
POOLER_HINT = (
    "a pooler in transaction mode (PgBouncer) in front of the database? start the"
    ' switchboard with --database-pooler (docs/deployment.md, "PgBouncer"), or give it'
    " the server's address"
)


class PoolerDetected(SchemaMismatch):
    """The connection did not keep what its start set: a pooler is between (and
    `pooled` was not said)."""


async def reach(dsn: str, *, upgrade: bool = False, pooled: bool = False) -> None:
    """Connect to `dsn` and create or check the schema there (with `upgrade`, bring an
    older one up to date: store/postgres_migrations.py), then let go: before serving, so a
    wrong URI or an unreachable server is said at once. Raises OSError,
    asyncpg.PostgresError, asyncpg.InterfaceError, ValueError (a malformed URI),
    SchemaMismatch (PoolerDetected)."""
    engine = PostgresEngine(
        dsn, min_connections=1, max_connections=1, upgrade=upgrade, pooled=pooled
    )
    await engine.open()
    await engine.close()


async def connect(dsn: str, *, pooled: bool = False, **kwargs: Any) -> Any:
    """One connection of its own to `dsn` (`pooled`: through a pooler in transaction
    mode, without named prepared statements; run each use in a transaction)."""
    if pooled:
        kwargs["statement_cache_size"] = 0
    return await asyncpg.connect(dsn, **kwargs)


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
    database an older release made up to this one's schema as it opens. `pooled`: `dsn`
    reaches the server through a pooler in transaction mode (the module's docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        statement_timeout_s: float = 30.0,
        idle_in_transaction_s: float = 5.0,
        upgrade: bool = False,
        pooled: bool = False,
    ) -> None:
        self.dsn = dsn
        self._upgrade = upgrade
        self.pooled = pooled
        self._min = min_connections
        self._max = max_connections
        self._timeout = statement_timeout_s
        self._idle_in_transaction = idle_in_transaction_s
        idle_ms = max(1, int(idle_in_transaction_s * 1000))
        self._settings = {
            "statement_timeout": str(int(statement_timeout_s * 1000)),
            "idle_in_transaction_session_timeout": str(idle_ms),
        }
        #: Behind a pooler: what follows each BEGIN, in the same message.
        self._local = "".join(f"; SET LOCAL {name} = {ms}" for name, ms in self._settings.items())
        self._pool: asyncpg.Pool[Any] | None = None
        #: Called after each write has committed (the live feed wakes on them).
        self._write_listeners: list[Callable[[], None]] = []

    async def open(self) -> None:
        """Create the schema or check its version (store/postgres_migrations), then connect
        the pool. The schema is made on a connection of its own, without the pool's
        statement timeout: creating it may take longer than any one request should."""
        idle = "idle_in_transaction_session_timeout"
        if self.pooled:
            conn = await connect(self.dsn, pooled=True)
        else:
            conn = await asyncpg.connect(self.dsn, server_settings={idle: self._settings[idle]})
        try:
            if not self.pooled:
                await self._check_session(conn, idle)
            await apply_schema(conn, self.dsn, upgrade=self._upgrade, pooled=self.pooled)
        finally:
            await conn.close()
        settings: dict[str, Any] = (
            {"statement_cache_size": 0} if self.pooled else {"server_settings": self._settings}
        )
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._min,
            max_size=self._max,
            command_timeout=self._timeout,
            reset=_keep_session,
            **settings,
        )

    async def _check_session(self, conn: Any, name: str) -> None:
        """Refuse a connection that does not have the setting its start gave it: a pooler
        dropped it (PgBouncer's ignore_startup_parameters), and so would run this one's
        transactions on sessions without it, and its prepared statements on sessions that
        never saw them. A pooler that refuses the setting instead fails the connect with
        "unsupported startup parameter" (the caller adds POOLER_HINT)."""
        have = await conn.fetchval("SELECT setting FROM pg_settings WHERE name = $1", name)
        if have != self._settings[name]:
            raise PoolerDetected(
                f"the connection to {shown_uri(self.dsn)} did not keep the {name}"
                f" ({self._settings[name]} ms) it was opened with (it has {have}): {POOLER_HINT}"
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
        async with self._pool.acquire() as conn, self._transaction(conn):
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
            self._transaction(conn, readonly=True),
        ):
            return await fn(conn)

    @asynccontextmanager
    async def _transaction(
        self, conn: Connection, *, readonly: bool = False
    ) -> AsyncIterator[None]:
        """A transaction on `conn` (`readonly`: a repeatable-read, read-only one). Behind a
        pooler, the timeouts are set for it alone, in its BEGIN's message (one round trip,
        as asyncpg's own BEGIN)."""
        if not self.pooled:
            async with (
                conn.transaction(isolation="repeatable_read", readonly=True)
                if readonly
                else conn.transaction()
            ):
                yield
            return
        begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if readonly else "BEGIN"
        await conn.execute(begin + self._local)  # simple protocol: several statements
        try:
            yield
        except BaseException:
            # What can't be rolled back here (a broken or busy connection) the pool's
            # release rolls back or drops.
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")

    def on_write(self, listener: Callable[[], None]) -> None:
        self._write_listeners.append(listener)

    @property
    def connections(self) -> int:
        """Connections the pool holds now (open, idle or in use)."""
        assert self._pool is not None, "store is not open"
        return self._pool.get_size()
