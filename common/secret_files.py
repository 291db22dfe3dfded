"""Files that hold a token: read only if no one but their owner may read or change them,
written so that no one else ever can.

Shared by the `switchboard` and `supervisor` commands (`--token-file`, the supervisor's
own credential). A token on a command line is visible to every user of the host (`ps`);
in a file with mode 0600 it is not.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

#: A token file is one line; anything much larger is not one.
MAX_SECRET_FILE_BYTES = 4096


class SecretFileError(ValueError):
    """A secret file that may not be used; the message names the file and what to do."""


def read_secret_file(path: Path | str) -> str:
    """The secret in `path` (surrounding whitespace removed). Refuses a file that group or
    others may read or write, anything but a regular file, and an empty or oversized one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        # Of the file opened (a symlink, as secret mounts use, is followed), not of whatever
        # the path names by now.
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise SecretFileError(
                f"{path} may be read or changed by others (mode {stat.S_IMODE(info.st_mode):04o}):"
                f" a token file must be private to its owner (chmod 600 {path})"
            )
        data = file.read(MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SecretFileError(f"{path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not UTF-8 text") from None
    if not text or "\n" in text:
        raise SecretFileError(f"{path} must hold exactly one line, the token")
    return text


def write_secret_file(path: Path, secret: str) -> None:
    """Write `secret` to `path` with mode 0600, atomically and durably: a crash leaves the
    old file or the new one, never a torn or readable one."""
    # A name of its own (mkstemp: created exclusively, mode 0600): one a crash left behind
    # never blocks the next write.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(secret.encode() + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_directory(directory: Path) -> Path:
    """`directory`, created with mode 0700 if missing; refused if others may enter it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        raise SecretFileError(
            f"{directory} may be read by others (mode {mode:04o}): chmod 700 {directory}"
        )
    return directory
