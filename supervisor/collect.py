"""Which files of a run's output directory to keep: the regular files matching the spec's
glob rules, within caps, and the ones refused with a reason.

The directory was written by the job, so nothing in it is trusted. The walk goes through
directory file descriptors opened with O_NOFOLLOW, never a path string: a symlink (to
/etc/passwd, or to a directory outside) is reported, never followed, and a directory
swapped for a link mid-walk fails to open instead of leading elsewhere. A file is opened
non-blocking and checked with fstat before it counts (a FIFO would block a plain open); its
size is taken once, there. A file still growing is kept with that size: the uploader sends
that many bytes, and their digest is what counts.

Rules are output globs, matched by protocol.globs (the switchboard picks a run's test
reports with the same matcher).
"""

from __future__ import annotations

import mimetypes
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from protocol import globs

#: Directories deeper than this are not walked (each level holds a descriptor open).
MAX_DEPTH = 32
#: Refusals listed one by one; past this many only `refused_unlisted` counts them.
MAX_REFUSED_LISTED = 1000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

#: Media types by suffix, before mimetypes' built-in table (never the host's
#: /etc/mime.types: the same file gets the same type on every host).
_MEDIA_TYPES = {".xml": "application/xml", ".log": "text/plain"}
_BUILTIN_TYPES = mimetypes.MimeTypes(filenames=())


@dataclass(frozen=True)
class Caps:
    max_files: int
    max_file_bytes: int
    max_total_bytes: int


@dataclass(frozen=True)
class Collected:
    """A file to upload: its path relative to the output directory (`/`-separated)."""

    path: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Refused:
    path: str
    reason: str


@dataclass
class Collection:
    files: list[Collected] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    #: Refusals beyond MAX_REFUSED_LISTED, counted only.
    refused_unlisted: int = 0

    def refuse(self, path: str, reason: str) -> None:
        if len(self.refused) < MAX_REFUSED_LISTED:
            self.refused.append(Refused(path, reason))
        else:
            self.refused_unlisted += 1


def check_rule(rule: str) -> list[str]:
    """A rule's components; ValueError if it is not a relative path that stays inside."""
    if not rule or rule.startswith("/") or "\\" in rule or "\0" in rule:
        raise ValueError(f"{rule!r}: a rule is a relative path, with / between components")
    parts = rule.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{rule!r}: no empty, '.' or '..' component")
    return parts


def media_type(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in _MEDIA_TYPES:
        return _MEDIA_TYPES[suffix]
    guessed, _ = _BUILTIN_TYPES.guess_type(path, strict=False)
    return guessed or "application/octet-stream"


def collect(root: Path, rules: Sequence[str], caps: Caps) -> Collection:
    """The files under `root` matching any rule, in path order, within `caps` (files are
    taken in that order: one that would pass a cap is refused, later ones may still fit),
    and the matching entries refused. Raises ValueError for a bad rule, OSError if `root`
    itself can't be opened as a directory (a symlink included)."""
    patterns = [tuple(check_rule(rule)) for rule in rules]
    found: list[tuple[str, int]] = []
    collection = Collection()
    top = os.open(root, _DIR_FLAGS)
    try:
        for path, size, reason in _walk(top, (), patterns):
            if reason is None:
                found.append((path, size))
            else:
                collection.refuse(path, reason)
    finally:
        os.close(top)
    total = 0
    for path, size in sorted(found):
        if size > caps.max_file_bytes:
            collection.refuse(path, f"{size} bytes, over the cap of {caps.max_file_bytes} a file")
        elif len(collection.files) >= caps.max_files:
            collection.refuse(path, f"over the cap of {caps.max_files} files")
        elif total + size > caps.max_total_bytes:
            collection.refuse(
                path, f"{size} bytes would take the total over the cap of {caps.max_total_bytes}"
            )
        else:
            total += size
            collection.files.append(Collected(path, size, media_type(path)))
    collection.refused.sort(key=lambda refused: refused.path)
    return collection


def open_collected(root: Path, path: str) -> BinaryIO:
    """Open a collected file for reading the way collect() found it: each directory with
    O_NOFOLLOW from `root`, so a link put in its way since is refused (OSError), not
    followed. The caller reads the size collect() gave (the file may have grown)."""
    parts = check_rule(path)
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        file = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        if not stat.S_ISREG(os.fstat(file).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(file, True)
        return os.fdopen(file, "rb")
    except BaseException:
        os.close(file)
        raise


Found = tuple[str, int, str | None]


def _walk(dir_fd: int, prefix: tuple[str, ...], patterns: list[tuple[str, ...]]) -> Iterator[Found]:
    """(path, size, None) of each matching regular file below `dir_fd`, (path, 0, reason)
    of each matching entry refused."""
    with os.scandir(dir_fd) as entries:
        names = sorted((entry.name, entry) for entry in entries)
    for name, entry in names:
        parts = (*prefix, name)
        path = "/".join(parts)
        matched = any(_matches(parts, pattern) for pattern in patterns)
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError as exc:
            if matched:
                yield path, 0, f"unreadable: {exc.strerror}"
            continue
        if stat.S_ISDIR(mode):
            if not any(_could_contain(parts, pattern) for pattern in patterns):
                continue
            if len(parts) >= MAX_DEPTH:
                yield path, 0, f"a directory deeper than {MAX_DEPTH} levels: not searched"
                continue
            try:
                inner = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:  # unreadable, or swapped for a link since
                yield path, 0, f"unreadable directory: {exc.strerror}"
                continue
            try:
                yield from _walk(inner, parts, patterns)
            finally:
                os.close(inner)
        elif stat.S_ISLNK(mode):
            if matched or any(_could_contain(parts, pattern) for pattern in patterns):
                yield path, 0, "a symbolic link: never followed"
        elif matched:
            yield _open_file(dir_fd, name, path, mode)


def _open_file(dir_fd: int, name: str, path: str, mode: int) -> Found:
    if not stat.S_ISREG(mode):
        return path, 0, f"not a regular file ({_kind(mode)})"
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:  # ELOOP: swapped for a link since the listing
        return path, 0, f"unreadable: {exc.strerror}"
    try:
        found = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(found.st_mode):  # swapped for something else since the listing
        return path, 0, f"not a regular file ({_kind(found.st_mode)})"
    return path, found.st_size, None


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return "unknown"


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    return globs.match_parts(parts, pattern, prefix_only=False)


def _could_contain(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether something below the directory `parts` may match `pattern`."""
    return globs.match_parts(parts, pattern, prefix_only=True)
