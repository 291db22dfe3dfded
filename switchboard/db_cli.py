"""`switchboard db ...`: the data dir's database, worked on directly: its schema version,
the upgrade to this release's schema (store/migrations.py; no server running), and a
backup of the data dir (while one serves it: switchboard/backup.py). With `--database`,
a PostgreSQL database instead (switchboard/db_postgres.py, switchboard/pg_backup.py)."""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path

from common import logfmt
from switchboard import datadir
from switchboard.admin_cli import data_dir, database_arg
from switchboard.config import Settings
from switchboard.datadir import DataDirError
from switchboard.secret_keys import SecretKeyError, load_keyring
from switchboard.store.migrations import check_version, database_version
from switchboard.store.schema import SCHEMA_VERSION, SchemaMismatch
from switchboard.store.uri import shown_uri


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        data_dir=data_dir(args.data_dir),
        secret_key_file=Path(args.secret_key_file) if args.secret_key_file else None,
        secret_key=os.environ.get("SWITCHBOARD_SECRET_KEY") or None,
    )


def _version(args: argparse.Namespace) -> int:
    if args.database:
        from switchboard.db_postgres import postgres_version

        version = postgres_version(args.database)
        path = shown_uri(args.database)
        upgrade = f"`switchboard db upgrade --database {path}`"
    else:
        database = _settings(args).database_path
        path, upgrade = str(database), "`switchboard db upgrade`"
        try:
            version = database_version(database)
        except sqlite3.Error as exc:
            raise SystemExit(f"switchboard: cannot read {path}: {exc}") from None
    if version is None:
        print(f"{path}: no database yet; this switchboard makes schema version {SCHEMA_VERSION}")
    elif version == SCHEMA_VERSION:
        print(f"{path}: schema version {version}, this release's")
    elif version < SCHEMA_VERSION:
        print(
            f"{path}: schema version {version}, older than this release's {SCHEMA_VERSION}:"
            f" {upgrade} brings it up to date"
        )
    else:
        print(
            f"{path}: schema version {version}, newer than this release's {SCHEMA_VERSION}:"
            " this release can't serve it"
        )
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from switchboard.upgrading import upgrade  # the store: only this command needs it

    logfmt.configure("text")
    if args.database:
        from switchboard.db_postgres import upgrade_postgres

        had = upgrade_postgres(args.database)
        where = shown_uri(args.database)
        if had == SCHEMA_VERSION:
            print(f"{where}: already at schema version {SCHEMA_VERSION}")
        else:
            print(f"{where}: upgraded from schema version {had} to {SCHEMA_VERSION}")
        return 0
    settings = _settings(args)
    path = settings.database_path
    try:
        datadir.prepare(settings.data_dir)
        with datadir.hold(settings.data_dir, exclusive=True):
            before = database_version(path)
            if before is None:
                raise SystemExit(f"switchboard: no database at {path}: nothing to upgrade")
            if before == SCHEMA_VERSION:
                print(f"{path}: already at schema version {SCHEMA_VERSION}")
                return 0
            check_version(before, path, upgrade=True)
            # The key seals the secret values a version-3 database kept in its job specs.
            upgrade(path, load_keyring(settings))
    except (DataDirError, SecretKeyError, SchemaMismatch) as exc:
        raise SystemExit(f"switchboard: {exc}") from None
    except sqlite3.Error as exc:
        raise SystemExit(f"switchboard: cannot upgrade {path}: {exc}") from None
    print(f"{path}: upgraded from schema version {before} to {SCHEMA_VERSION}")
    return 0


def _backup(args: argparse.Namespace) -> int:
    from switchboard.backup import backup_data_dir

    settings = _settings(args)
    if args.database:
        return _backup_postgres(args, settings)
    path = settings.database_path
    if database_version(path) is None:
        raise SystemExit(f"switchboard: no database at {path}: nothing to back up")
    into = Path(args.to)
    if into.resolve() == settings.data_dir.resolve():
        raise SystemExit("switchboard: --to is the data dir itself: back up somewhere else")
    try:
        done = backup_data_dir(path, settings.artifacts_dir, into)
    except (OSError, sqlite3.Error) as exc:
        raise SystemExit(f"switchboard: backup into {into} failed: {exc}") from None
    print(
        f"{into}: database {done.database_bytes} bytes; artifacts: {done.artifacts_copied}"
        f" copied, {done.artifacts_kept} already there"
    )
    for digest in done.missing:
        print(f"artifact {digest} was removed (retention) before it could be copied")
    print(
        "not copied: the secret key (keep it apart; back it up on its own). Serve the copy"
        f" with `switchboard serve --data-dir {into}` and that key."
    )
    return 0


def _backup_postgres(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from switchboard.db_postgres import REACH_ERRORS
    from switchboard.pg_backup import DUMP_NAME, PgBackupError, backup_postgres

    into = Path(args.to)
    if into.resolve() == settings.data_dir.resolve():
        raise SystemExit("switchboard: --to is the data dir itself: back up somewhere else")
    try:
        done = asyncio.run(backup_postgres(args.database, settings.artifacts_dir, into))
    except PgBackupError as exc:
        raise SystemExit(f"switchboard: {exc}") from None
    except REACH_ERRORS as exc:
        raise SystemExit(f"switchboard: backup into {into} failed: {exc}") from None
    print(
        f"{into / DUMP_NAME}: schema version {done.schema_version}, {done.database_bytes}"
        f" bytes (by {done.pg_dump}); artifacts: {done.artifacts_copied} copied,"
        f" {done.artifacts_kept} already there"
    )
    for digest in done.missing:
        print(f"artifact {digest} was removed (retention) before it could be copied")
    print(
        "not copied: the secret key (keep it apart; back it up on its own). To restore:"
        f" `pg_restore --no-owner --dbname=URI {into / DUMP_NAME}` into an empty database,"
        f" then `switchboard serve --database URI --data-dir {into}` with that key."
    )
    return 0


def add_db_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser(
        "db",
        help="the data dir's database (or --database's): its schema version, upgrading it,"
        " backing it up",
    ).add_subparsers(dest="db_command")
    group.required = True
    for name, help, func in [
        ("version", "the database's schema version and this release's", _version),
        (
            "upgrade",
            "upgrade a database an older release made to this release's schema (stop the"
            " switchboard first; an SQLite file is copied aside before it changes, a"
            " PostgreSQL database is not: back it up first)",
            _upgrade,
        ),
        (
            "backup",
            "copy the data dir (database and artifacts, not the secret key) into --to DIR,"
            " a data dir a switchboard can serve; with --database, a pg_dump of the database"
            " and the artifacts; safe while the switchboard runs",
            _backup,
        ),
    ]:
        parser = group.add_parser(name, help=help)
        parser.add_argument(
            "--data-dir", help="the switchboard's data dir (default ./switchboard-data)"
        )
        parser.add_argument(
            "--secret-key-file",
            default=os.environ.get("SWITCHBOARD_SECRET_KEY_FILE"),
            metavar="PATH",
            help="the key that seals secret parameter values, as for `serve`",
        )
        parser.add_argument(
            "--database",
            type=database_arg,
            default=os.environ.get("SWITCHBOARD_DATABASE") or None,
            metavar="URI",
            help="a PostgreSQL database (postgresql://user@host/db), as for `serve`, instead"
            " of the data dir's SQLite file (env SWITCHBOARD_DATABASE)",
        )
        if name == "backup":
            parser.add_argument("--to", required=True, metavar="DIR", help="the copy's data dir")
        parser.set_defaults(func=func)
