"""Which store a switchboard serves from: the data dir's SQLite file (the default), or
the PostgreSQL database `--database` names (docs/deployment.md, "PostgreSQL")."""

from __future__ import annotations

from switchboard.config import Settings
from switchboard.sealing import Keyring
from switchboard.store.base import Store

#: How a PostgreSQL URI starts (libpq takes both).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def database_uri(text: str) -> str:
    """`text` if it names a PostgreSQL database; ValueError saying what is wanted if not."""
    if not text.startswith(POSTGRES_SCHEMES):
        raise ValueError(
            "--database takes a PostgreSQL URI (postgresql://user@host:5432/dbname);"
            " without it, the switchboard keeps its SQLite file in the data dir"
        )
    return text


def make_store(settings: Settings, keyring: Keyring | None = None) -> Store:
    """The store `settings` name, not opened yet."""
    max_run_output = settings.max_run_output_bytes or None
    if settings.database is not None:
        from switchboard.store.postgres import PostgresStore  # asyncpg only when asked

        return PostgresStore(
            settings.database,
            keyring=keyring,
            max_run_output=max_run_output,
            replica_id=settings.replica_id,
            notify=settings.notify,
            checked_classes=frozenset(settings.health_checks),
            lease_ttl_s=settings.leader_lease_s,
            pooled=settings.database_pooler,
        )
    from switchboard.store.sqlite import SQLiteStore

    return SQLiteStore(
        settings.database_path,
        keyring=keyring,
        max_run_output=max_run_output,
        checked_classes=frozenset(settings.health_checks),
    )
