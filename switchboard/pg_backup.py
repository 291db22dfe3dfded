"""`switchboard db backup --database URI --to DIR`: a PostgreSQL database and what the data
dir keeps beside it, copied into DIR while switchboards serve them (docs/deployment.md,
"Backup and restore").

The database is dumped by PostgreSQL's own `pg_dump`, in its custom format, to
DIR/switchboard.pgdump (restored with `pg_restore` into an empty database). Its snapshot
is one this module's transaction exported: the artifacts that snapshot names are read in
it, so the dump and the list of artifacts to copy are of one moment, however long the
dump takes, and the switchboards serving the database go on meanwhile. The artifacts'
bytes are in the database (artifact_chunks), so in the dump; only those an upgrade from
before schema version 15 left without chunks (their bytes still a file of a data dir)
are copied from the data dir into DIR/artifacts, as for an SQLite data dir
(switchboard/backup.py). The secret key is not copied.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import asyncpg

from switchboard import datadir
from switchboard.backup import BackupDone, copy_artifacts
from switchboard.store.postgres_migrations import schema_version
from switchboard.store.postgres_schema import ARTIFACT_CHUNKS, MIGRATIONS
from switchboard.store.uri import shown_uri

#: The schema version from which artifacts' bytes are in the database.
ARTIFACT_CHUNKS_VERSION = next(to for to, step in MIGRATIONS if step is ARTIFACT_CHUNKS)

#: The dump's name in the backup's directory.
DUMP_NAME = "switchboard.pgdump"
#: Where Debian installs each major version's programs.
DEBIAN_PG_BIN = "/usr/lib/postgresql/{major}/bin"


class PgBackupError(Exception):
    """The backup could not be made (the message says why)."""


@dataclass
class PgBackupDone(BackupDone):
    schema_version: int = 0
    pg_dump: str = ""


def _major(pg_dump: str) -> int | None:
    """The major version of the pg_dump at `pg_dump` ("pg_dump (PostgreSQL) 15.18")."""
    try:
        done = subprocess.run(
            [pg_dump, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return None
    found = re.search(r"\)\s+(\d+)", done.stdout)
    return int(found.group(1)) if done.returncode == 0 and found else None


def find_pg_dump(server_major: int) -> str:
    """A pg_dump that can dump a server of `server_major` (its own major version or newer):
    the one in $SWITCHBOARD_PG_BIN if that is set (alone: an explicit choice), else
    Debian's for that version, else the one on PATH. Raises PgBackupError saying what is
    missing or too old."""
    chosen = os.environ.get("SWITCHBOARD_PG_BIN")
    if chosen:
        places = [chosen]
        candidates = [str(Path(chosen) / "pg_dump")]
    else:
        places = [DEBIAN_PG_BIN.format(major=server_major), "PATH"]
        candidates = [str(Path(places[0]) / "pg_dump")]
        on_path = shutil.which("pg_dump")
        if on_path:
            candidates.append(on_path)
    too_old = []
    for candidate in candidates:
        if not Path(candidate).exists():
            continue
        major = _major(candidate)
        if major is not None and major >= server_major:
            return candidate
        too_old.append(f"{candidate} ({'version unknown' if major is None else major})")
    if too_old:
        raise PgBackupError(
            f"the PostgreSQL server is version {server_major}, and pg_dump must be that"
            f" version or newer: found only {', '.join(too_old)}; install"
            f" postgresql-client-{server_major} (or set SWITCHBOARD_PG_BIN to the directory"
            " of a pg_dump that is)"
        )
    raise PgBackupError(
        f"pg_dump is missing (looked in {' and '.join(places)}): install"
        f" postgresql-client-{server_major} (or set SWITCHBOARD_PG_BIN to the directory of"
        " its pg_dump)"
    )


def _split_password(dsn: str) -> tuple[str, str | None]:
    """`dsn` without its password (never on a command line: every local user sees those),
    and the password, for pg_dump's environment."""
    scheme, sep, rest = dsn.partition("://")
    place, query_sep, query = rest.partition("?")
    authority, slash, path = place.partition("/")
    user, at, host = authority.rpartition("@")
    password = None
    if at and ":" in user:
        user, password = user.split(":", 1)
    kept = []
    for item in query.split("&") if query_sep else []:
        if item.lower().startswith("password="):
            password = item.split("=", 1)[1]
        else:
            kept.append(item)
    query_part = "?" + "&".join(kept) if kept else ""
    return f"{scheme}{sep}{user}{at}{host}{slash}{path}{query_part}", password


async def backup_postgres(dsn: str, artifacts: Path, into: Path) -> PgBackupDone:
    """Dump the database `dsn` names into `into`/DUMP_NAME and copy the artifacts it names
    without their bytes from `artifacts` into `into`. Raises PgBackupError, and what
    reaching the database raises (OSError, asyncpg's errors)."""
    done = PgBackupDone()
    conn = await asyncpg.connect(dsn)
    try:
        pg_dump = find_pg_dump(conn.get_server_version().major)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            version = await schema_version(conn)
            if version is None:
                raise PgBackupError(
                    f"no switchboard schema in {shown_uri(dsn)}: nothing to back up"
                )
            # Those whose bytes are in no chunk (indexed before schema version 15; the
            # empty one has none, and needs none); before 15, all of them.
            no_chunks = (
                " WHERE size > 0 AND NOT EXISTS"
                " (SELECT 1 FROM artifact_chunks c WHERE c.digest = a.digest)"
                if version >= ARTIFACT_CHUNKS_VERSION
                else ""
            )
            named = [r[0] for r in await conn.fetch("SELECT digest FROM artifacts a" + no_chunks)]
            datadir.private_dir(into)
            target = into / DUMP_NAME
            partial = target.with_name(target.name + ".partial")
            partial.unlink(missing_ok=True)
            datadir.private_file(partial)
            bare, password = _split_password(dsn)
            env = dict(os.environ)
            if password is not None:
                env["PGPASSWORD"] = unquote(password)
            process = await asyncio.create_subprocess_exec(
                *(pg_dump, "--format=custom", f"--snapshot={snapshot}", "--no-password"),
                *(f"--file={partial}", f"--dbname={bare}"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            _, stderr = await process.communicate()
            if process.returncode != 0:
                partial.unlink(missing_ok=True)
                said = stderr.decode(errors="replace").strip()
                raise PgBackupError(f"{pg_dump} failed (exit {process.returncode}): {said}")
    finally:
        await conn.close()
    partial.replace(target)  # whole or not at all: an interrupted backup leaves the old one
    done.database_bytes = target.stat().st_size
    done.schema_version = version
    done.pg_dump = pg_dump
    copy_artifacts(named, artifacts, into, done)
    return done
