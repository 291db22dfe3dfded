"""Schema migrations of the PostgreSQL store, the twin of store/migrations.py: a new
database is created at the baseline and taken through every step; an older one is
checked (store/migrations.py check_version, the rule both stores share) and upgraded only
when asked (`switchboard db upgrade --database`, `switchboard serve --database --upgrade`).

The steps are postgres_schema.MIGRATIONS. Each runs in a transaction of its own that also
records the version it reached, so an interrupted upgrade resumes at the step that did
not finish (PostgreSQL's DDL is transactional: a failed step leaves nothing behind).
Whoever creates, checks or upgrades the schema holds an advisory lock on the database for
the whole of it: two upgraders never interleave, and a switchboard starting meanwhile
waits, then finds the version the upgrade reached (refusing it if that is newer than it
knows). An upgrade is refused while a replica serving the database renews its liveness
(switchboard_replicas): stop them all first.

Through a pooler in transaction mode (`pooled`: `serve --database-pooler`), a session
lock would stay with whichever server session ran it: there the schema is checked, or a
new one created, in one transaction under the same lock taken for that transaction alone,
and an upgrade (several transactions) is refused: `switchboard db upgrade` goes to the
server directly.

Unlike SQLite's, a PostgreSQL database is not copied aside before an upgrade: back it up
with `switchboard db backup --database` (switchboard/pg_backup.py) first.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from switchboard import lease
from switchboard.store.migrations import MIGRATIONS as SQLITE_MIGRATIONS
from switchboard.store.migrations import check_version
from switchboard.store.postgres_schema import MIGRATIONS, POSTGRES_BASELINE, SCHEMA, Step
from switchboard.store.schema import SchemaMismatch
from switchboard.store.uri import shown_uri

log = logging.getLogger(__name__)

#: The advisory lock of the schema (the key releases before upgrades existed take too,
#: as a transaction's lock: they wait for an upgrade as well).
_LOCK_KEY = "hashtext('switchboard schema')"

#: A replica that renewed its liveness this recently is taken to be serving (replicas
#: renew every 2 s or faster; one that stopped cleanly has removed its row).
REPLICA_ALIVE_S = lease.LEASE_TTL_S

_SUMMARIES = {m.to: m.summary for m in SQLITE_MIGRATIONS}


class ReplicasServing(SchemaMismatch):
    """An upgrade refused: switchboards are serving the database."""


class UpgradeThroughPooler(SchemaMismatch):
    """An upgrade refused: asked through a pooler in transaction mode."""


_WAITING = (
    "another switchboard is creating, checking or upgrading the database's schema:"
    " waiting for it to finish"
)


@asynccontextmanager
async def schema_lock(conn: Any, *, pooled: bool = False) -> AsyncIterator[None]:
    """Hold the schema's advisory lock (session-level: across the transactions of an
    upgrade's steps); say so once if another holder makes this one wait. `pooled`: in a
    transaction of its own, for that transaction (the block runs inside it)."""
    if pooled:
        async with conn.transaction():
            if not await conn.fetchval(f"SELECT pg_try_advisory_xact_lock({_LOCK_KEY})"):
                log.warning(_WAITING)
                await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
            yield
        return
    if not await conn.fetchval(f"SELECT pg_try_advisory_lock({_LOCK_KEY})"):
        log.warning(_WAITING)
        await conn.execute(f"SELECT pg_advisory_lock({_LOCK_KEY})")
    try:
        yield
    finally:
        if not conn.is_closed():  # a closed session has let go of it
            await conn.execute(f"SELECT pg_advisory_unlock({_LOCK_KEY})")


async def schema_version(conn: Any) -> int | None:
    """The database's schema version (None: no switchboard schema in it yet)."""
    if not await conn.fetchval("SELECT to_regclass('switchboard_schema') IS NOT NULL"):
        return None
    version = await conn.fetchval("SELECT version FROM switchboard_schema")
    return None if version is None else int(version)


async def live_replicas(conn: Any, alive_s: float = REPLICA_ALIVE_S) -> list[tuple[str, float]]:
    """The replicas that renewed their liveness within `alive_s` (the database's clock):
    (id, seconds since), by id. None before the schema version that records them."""
    if not await conn.fetchval("SELECT to_regclass('switchboard_replicas') IS NOT NULL"):
        return []
    rows = await conn.fetch(
        "SELECT id, extract(epoch FROM clock_timestamp())::float8 - last_seen"
        " FROM switchboard_replicas"
        " WHERE last_seen >= extract(epoch FROM clock_timestamp())::float8 - $1 ORDER BY id",
        alive_s,
    )
    return [(r[0], max(0.0, float(r[1]))) for r in rows]


async def _run(conn: Any, step: Step) -> None:
    if isinstance(step, str):
        await conn.execute(step)
    else:
        await step(conn)


async def apply_schema(
    conn: Any,
    dsn: str,
    *,
    upgrade: bool = False,
    steps: Sequence[tuple[int, Step]] = MIGRATIONS,
    replica_alive_s: float = REPLICA_ALIVE_S,
    pooled: bool = False,
) -> None:
    """Create the tables of a new database (`conn`: an asyncpg connection to `dsn`, which
    names it in messages), or check an existing one's version and, with `upgrade`, bring
    it up to this one step by step. Raises SchemaMismatch (SchemaTooNew, SchemaOutdated,
    ReplicasServing, UpgradeThroughPooler). `steps`: the migrations past the baseline
    (tests give their own). `pooled`: `conn` goes through a pooler in transaction mode
    (the module's docstring)."""
    if upgrade and pooled:
        raise UpgradeThroughPooler(
            f"the schema of {shown_uri(dsn)} is not upgraded through a pooler in"
            " transaction mode (--database-pooler): run `switchboard db upgrade --database"
            " URI` with the PostgreSQL server's own address, then start the replicas"
        )
    current = POSTGRES_BASELINE + len(steps)
    for number, (to, _) in enumerate(steps, POSTGRES_BASELINE + 1):
        assert to == number, f"migration to {to} where {number} is next"
    async with schema_lock(conn, pooled=pooled):
        version = await schema_version(conn)
        if version is None:
            # A new database is made as SQLite's are: the baseline, then every step.
            async with conn.transaction():
                await conn.execute(SCHEMA)
                for _, step in steps:
                    await _run(conn, step)
                await conn.execute("INSERT INTO switchboard_schema (version) VALUES ($1)", current)
            return
        if version == current:
            return
        check_version(version, dsn, upgrade=upgrade, current=current, oldest=POSTGRES_BASELINE)
        alive = await live_replicas(conn, replica_alive_s)
        if alive:
            names = ", ".join(f"{name} ({ago:.1f} s ago)" for name, ago in alive)
            raise ReplicasServing(
                f"the PostgreSQL database {shown_uri(dsn)} is served by switchboard"
                f" replicas alive within {replica_alive_s:g} s: {names}; stop them all,"
                " then upgrade (a replica that was killed is forgotten"
                f" {replica_alive_s:g} s after it was last seen)"
            )
        log.warning(
            "upgrading the PostgreSQL database %s from schema version %d to %d",
            shown_uri(dsn),
            version,
            current,
        )
        for to, step in steps[version - POSTGRES_BASELINE :]:
            log.info("schema version %d: %s", to, _SUMMARIES.get(to, ""))
            async with conn.transaction():
                await _run(conn, step)
                await conn.execute("UPDATE switchboard_schema SET version = $1", to)
        log.warning("the database is at schema version %d", current)
