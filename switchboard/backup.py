"""A copy of a data dir that a switchboard can serve, made while one serves it
(`switchboard db backup`).

The database is copied with SQLite's online backup API in one step: one read transaction,
so the copy is one consistent snapshot, and in WAL mode the switchboard's writer goes on
meanwhile (copied in several steps, a backup would start over at every write the
switchboard made, and might never end).
Then the artifacts: files named by their digest, never changed once there, so a plain
copy of each is exact (those the backup already holds are left as they are: a backup
into the same directory again copies only what is new). An artifact the snapshot names
that retention removed in between is reported, not invented. The key that seals secret
parameter values is not copied: it is kept apart from backups on purpose.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from switchboard import datadir


@dataclass
class BackupDone:
    database_bytes: int = 0
    artifacts_copied: int = 0
    artifacts_kept: int = 0
    #: Digests the copied database names whose file was gone by the time it was copied.
    missing: list[str] = field(default_factory=list)


def backup_data_dir(database: Path, artifacts: Path, into: Path) -> BackupDone:
    """Copy the database at `database` and the artifacts under `artifacts` into the data
    dir `into` (made private; its database replaced, its artifacts added to)."""
    datadir.private_dir(into)
    done = BackupDone()
    target = into / database.name
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    datadir.private_file(partial)
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    copy = sqlite3.connect(partial)
    try:
        source.backup(copy)  # one step: see above
        named = [row[0] for row in copy.execute("SELECT digest FROM artifacts")]
    finally:
        copy.close()
        source.close()
    partial.replace(target)  # whole or not at all: an interrupted backup leaves the old one
    for stale in (target.with_name(target.name + "-wal"), target.with_name(target.name + "-shm")):
        stale.unlink(missing_ok=True)
    done.database_bytes = target.stat().st_size
    copy_artifacts(named, artifacts, into, done)
    return done


def copy_artifacts(named: list[str], artifacts: Path, into: Path, done: BackupDone) -> None:
    """Copy the artifacts `named` (digests) from the artifacts dir `artifacts` into the
    data dir `into`, counting them in `done`: those already there are kept, those gone
    (retention removed them since the database was read) listed as missing."""
    for digest in named:
        algorithm, _, hexdigest = digest.partition(":")
        have = artifacts / algorithm / hexdigest
        want = into / artifacts.name / algorithm / hexdigest
        if want.exists():  # named by its digest: the same bytes (a crash mid-copy: see below)
            done.artifacts_kept += 1
            continue
        if not have.exists():
            done.missing.append(digest)
            continue
        datadir.private_dir(want.parent)
        part = want.with_name(want.name + ".partial")
        shutil.copyfile(have, part)
        part.chmod(0o600)
        part.replace(want)  # a file under its digest's name is always whole
        done.artifacts_copied += 1
