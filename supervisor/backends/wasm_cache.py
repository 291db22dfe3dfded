"""A bounded directory of cache files, least recently used evicted first.

The wasm backend keeps module bytes and their compiled code here, so a module is neither
fetched nor compiled again, also after the supervisor restarts. This class knows nothing
about Wasm: it stores named byte strings as files.

- Every file carries a checksum of its content. A file that is cut short, flipped or not
  ours reads as a miss and is deleted: what the cache returns is what was put.
- Writes go to a temporary file in the same directory and are renamed into place, so a
  reader (this process or another supervisor sharing the directory) never sees half a file.
- "Recently used" is a file's modification time: `get` refreshes it. The directory itself
  is the index: `evict` scans it, so several processes sharing a directory stay within the
  bound together, and nothing has to be loaded at start.
- The total of the entries' sizes stays at most `max_bytes` after every `put`; an entry
  bigger than that on its own is not stored at all.

Calls do blocking file I/O: run them in a worker thread. They are thread-safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Starts every cache file: format name and version, then the SHA-256 of the content.
MAGIC = b"switchboard-cache-1\n"
_HEADER_LEN = len(MAGIC) + 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_TEMP_PREFIX = ".tmp-"
#: A temporary file this old was left by a writer that died; younger ones may be in use.
STALE_TEMP_S = 3600.0


@dataclass(frozen=True)
class Entry:
    name: str
    size: int  # bytes on disk, header included
    last_used_ns: int


class DiskCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()

    def get(self, name: str) -> bytes | None:
        """The content stored as `name`, or None (missing, or corrupt and now deleted)."""
        path = self._path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache: cannot read %s: %s", path, exc)
            return None
        content = raw[_HEADER_LEN:]
        if (
            len(raw) < _HEADER_LEN
            or not raw.startswith(MAGIC)
            or hashlib.sha256(content).digest() != raw[len(MAGIC) : _HEADER_LEN]
        ):
            log.warning("cache: %s is corrupt; discarded", path)
            self.discard(name)
            return None
        self.touch(name)
        return content

    def put(self, name: str, content: bytes) -> bool:
        """Store `content` as `name` (replacing what was there), then evict down to the
        bound. False if the entry alone is over the bound, so it was not stored."""
        path = self._path(name)
        if _HEADER_LEN + len(content) > self.max_bytes:
            return False
        temp = self.root / f"{_TEMP_PREFIX}{name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            with open(temp, "wb") as file:
                file.write(MAGIC)
                file.write(hashlib.sha256(content).digest())
                file.write(content)
            # No fsync: after a crash a torn file fails its checksum and is recompiled.
            os.replace(temp, path)
        finally:
            with suppress(FileNotFoundError):
                temp.unlink()
        self.touch(name)
        self.evict(keep=name)
        return True

    def touch(self, name: str) -> None:
        """Mark `name` most recently used. (Explicit nanoseconds: the kernel's own file
        timestamps move in steps of a few milliseconds.)"""
        now = time.time_ns()
        with suppress(OSError):
            os.utime(self._path(name), ns=(now, now))

    def discard(self, name: str) -> None:
        with suppress(FileNotFoundError):
            self._path(name).unlink()

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used entries until the total is within the bound; never
        `keep` (the entry just written). Returns the names deleted."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        evicted = []
        for entry in sorted(entries, key=lambda e: (e.last_used_ns, e.name)):
            if total <= self.max_bytes:
                break
            if entry.name == keep:
                continue
            self.discard(entry.name)  # another process may have deleted it first: fine
            total -= entry.size
            evicted.append(entry.name)
        if evicted:
            log.debug("cache: evicted %s", ", ".join(evicted))
        return evicted

    def entries(self) -> list[Entry]:
        found = []
        with os.scandir(self.root) as scan:
            for item in scan:
                if item.name.startswith(".") or not _NAME.match(item.name):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if item.is_file(follow_symlinks=False):
                    found.append(Entry(item.name, st.st_size, st.st_mtime_ns))
        return found

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"not a valid cache entry name: {name!r}")
        return self.root / name

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        with os.scandir(self.root) as scan:
            for item in scan:
                if item.name.startswith(_TEMP_PREFIX):
                    with suppress(OSError):
                        if item.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(item.path)
