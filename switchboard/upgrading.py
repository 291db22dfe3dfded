"""Bringing a data dir's database to this release's schema before serving it, or for
`switchboard db upgrade` (the steps: store/migrations.py; docs/deployment.md,
"Upgrading"). An upgrade holds the data dir alone: it refuses while a switchboard serves
it, and a switchboard can't start while it runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO

from switchboard import datadir
from switchboard.config import Settings
from switchboard.sealing import Keyring
from switchboard.store.migrations import check_version, database_version
from switchboard.store.schema import SCHEMA_VERSION
from switchboard.store.sqlite import SQLiteStore


def upgrade(path: Path, keyring: Keyring) -> None:
    """Upgrade the database at `path` (the data dir held alone): a copy first, then every
    step (store/migrations.py). `keyring` seals what a version-3 database kept in clear."""
    store = SQLiteStore(path, keyring=keyring, upgrade=True)

    async def run() -> None:
        await store.open()
        await store.close()

    asyncio.run(run())


def prepare_to_serve(settings: Settings, keyring: Keyring) -> IO[bytes]:
    """Hold the data dir for serving (shared with other switchboards, never with an
    upgrade), refuse a database of another version, or upgrade it first with
    `settings.upgrade_schema`. Keep the returned file open while serving. Raises
    DataDirError, SchemaMismatch."""
    path = settings.database_path
    held = datadir.hold(settings.data_dir, exclusive=settings.upgrade_schema)
    try:
        # On PostgreSQL (--database) the data dir holds artifacts only: the database's
        # schema is created or checked as the store opens (store/postgres_schema.py).
        version = None if settings.database else database_version(path)
        if version is not None and version != SCHEMA_VERSION:
            check_version(version, path, upgrade=settings.upgrade_schema)
            upgrade(path, keyring)
        datadir.share(held)
    except BaseException:
        held.close()
        raise
    return held
