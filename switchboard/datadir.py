"""The data dir is private to the user the switchboard runs as: the directory and every
directory in it 0700, every file 0600. It holds job specs and output, token hashes and
sealed secrets; nobody else on the host has a reason to read any of it.

New files are made so where they are created (the store, artifacts). A data dir made by
an older version, or loosened by hand, is tightened at start: group and others lose
every right on everything in it (one stat per entry; symbolic links in it are left alone).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path
from typing import IO

log = logging.getLogger("switchboard")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


class DataDirError(Exception):
    """The data dir can't be made private; the message says which path and why."""


def private_dir(path: Path) -> None:
    """Make `path` (parents as needed) and leave it 0700, or tighten it if it exists."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    _tighten(path, path.lstat())


def private_file(path: Path) -> None:
    """Make `path` an empty file at 0600 if it is missing, or tighten it if it exists."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    except FileExistsError:
        _tighten(path, path.lstat())


def tighten_if_present(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    _tighten(path, info)


def prepare(data_dir: Path) -> int:
    """Make the data dir private (creating it if missing); if it was not, tighten
    everything in it too. Return how many entries had to be tightened."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        data_dir = data_dir.resolve()  # a link to it: the directory itself is tightened
        if not stat.S_IMODE(data_dir.stat().st_mode) & 0o077:
            # Nobody else can reach anything in it; what the switchboard makes in it is
            # private anyway. (Walking it costs a stat per file at every start.)
            return 0
        tightened = 0
        # Links to directories are not followed; a directory that can't be listed fails.
        for root, _, files in os.walk(data_dir, onerror=_raise):
            base = Path(root)
            if _tighten(base, base.lstat()):
                tightened += 1
            for name in files:
                entry = base / name
                if _tighten(entry, entry.lstat()):
                    tightened += 1
    except OSError as exc:
        where = exc.filename or data_dir
        raise DataDirError(
            f"cannot make the data dir private ({where}: {exc.strerror}); the switchboard"
            " needs to own it"
        ) from None
    if tightened:
        log.warning(
            "the data dir %s was readable by other users: %d entries tightened to 0700/0600",
            data_dir,
            tightened,
        )
    return tightened


#: The file a serving switchboard holds a shared lock on, and an upgrade an exclusive one.
LOCK_FILE = "switchboard.lock"


class DataDirBusy(DataDirError):
    """A switchboard is serving the data dir, and what was asked needs it alone."""


def hold(data_dir: Path, *, exclusive: bool) -> IO[bytes]:
    """Lock the data dir for as long as the returned file stays open (the kernel lets go
    when the process ends, however it ends): shared by every switchboard serving it,
    exclusive for an upgrade, which must not change the database under one."""
    path = data_dir / LOCK_FILE
    private_file(path)
    held = open(path, "rb")
    try:
        fcntl.flock(held, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        if exclusive:
            raise DataDirBusy(
                f"a switchboard is serving the data dir {data_dir}: stop it first"
            ) from None
        raise DataDirBusy(f"the data dir {data_dir} is being upgraded") from None
    return held


def share(held: IO[bytes]) -> None:
    """Turn an exclusive hold into a shared one (the upgrade is done: serve)."""
    fcntl.flock(held, fcntl.LOCK_SH)


def _raise(exc: OSError) -> None:
    raise exc


def _tighten(path: Path, info: os.stat_result) -> bool:
    """Take group and others' rights off a file or directory; True if there were any."""
    if stat.S_ISLNK(info.st_mode):
        return False
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return False
    os.chmod(path, mode & ~0o077)
    return True
