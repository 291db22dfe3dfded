"""Artifact bytes of a PostgreSQL store: chunks in the database (store/postgres_chunks.py),
so every replica reaches every artifact, and a cache of them in this replica's data dir
(`<data dir>/artifacts/sha256/<hex>`, the files as the SQLite store keeps them).

- An upload is indexed and its chunks written in one transaction (a digest is never
  indexed without its bytes); its temporary file then becomes this replica's cached copy.
- A read first asks the index: a digest it no longer has is not served, and a cached file
  of it goes (retention on another replica deleted it). Then the cached file if there is
  one (a hit), else the chunks are fetched one at a time into a temporary file, checked
  against the digest, and renamed into the cache before anything is served (a miss).
- The cache holds at most `cap` bytes: past it, the files read least recently go (one
  being read stays readable: it is open). An artifact larger than the cap is served from
  its file and not kept.
- A database upgraded from schema version 13 has artifacts indexed whose bytes are only
  files in the data dir of the replica that took them: read through that replica, such a
  file is imported into chunks (checked against its digest) before it is served; one is
  never evicted before the database holds its bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from protocol.limits import EMPTY_DIGEST
from switchboard import metrics
from switchboard.artifacts import ArtifactFiles, Upload
from switchboard.lograte import RateLimitedLog
from switchboard.models import ArtifactAdded
from switchboard.store.postgres import PostgresStore
from switchboard.store.postgres_chunks import NotTheDigest

log = logging.getLogger("switchboard.artifacts")
_once = RateLimitedLog(log)
_FILL_PREFIX = ".upload-cache-"  # retention's sweep of `.upload-*` removes a crash's
#: Fills at once: each holds one of the store's pooled connections (a read transaction)
#: while its chunks come, so that many misses at once leave the pool to other requests.
FILLS_AT_ONCE = 3


class CacheIndex:
    """The artifact files of a data dir, least recently read first, and their bytes."""

    def __init__(self, files: ArtifactFiles) -> None:
        self.files = files
        self.entries: OrderedDict[str, int] = OrderedDict()
        found: list[tuple[float, str, int]] = []
        for path in (files.root / "sha256").iterdir():
            if path.name.startswith(".") or not path.is_file():
                continue
            stat = path.stat()
            found.append((stat.st_mtime, f"sha256:{path.name}", stat.st_size))
        for _, digest, size in sorted(found):
            self.entries[digest] = size
        self.total = sum(self.entries.values())
        metrics.ARTIFACT_CACHE_BYTES.set(self.total)

    def used(self, digest: str, size: int) -> None:
        self.total += size - self.entries.pop(digest, 0)
        self.entries[digest] = size
        metrics.ARTIFACT_CACHE_BYTES.set(self.total)
        try:
            os.utime(self.files.path(digest))  # the order survives a restart
        except FileNotFoundError:
            pass

    def drop(self, digest: str) -> bool:
        """Remove the file; True if there was one."""
        self.files.remove(digest)
        if digest not in self.entries:
            return False
        self.total -= self.entries.pop(digest)
        metrics.ARTIFACT_CACHE_BYTES.set(self.total)
        return True


class PostgresBlobs:
    """`cap`: the bytes of artifact files this replica keeps (0: none kept past a read)."""

    def __init__(self, store: PostgresStore, files: ArtifactFiles, cap: int) -> None:
        self.store = store
        self.files = files
        self.cap = cap
        self.cache = CacheIndex(files)
        #: Digests whose bytes the database is known to hold (a cached file of one may go).
        self._in_database: set[str] = {EMPTY_DIGEST}
        self._fills = asyncio.Semaphore(FILLS_AT_ONCE)
        #: One fill (or import) of a digest at a time.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, digest: str) -> asyncio.Lock:
        lock = self._locks.get(digest)
        if lock is None:
            lock = self._locks[digest] = asyncio.Lock()
        return lock

    async def receive(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Upload:
        return await self.files.receive(chunks, max_bytes)

    async def keep(
        self, upload: Upload, uploaded_by: str | None, quota: int | None
    ) -> ArtifactAdded:
        added = await self.store.add_artifact_bytes(
            upload.digest, upload.size, uploaded_by, quota, upload.path
        )
        if added.outcome != "full":
            async with self._lock(upload.digest):
                self.files.keep(upload)
                self._in_database.add(upload.digest)
                self.cache.used(upload.digest, upload.size)
            await self._trim(keep=upload.digest)
        return added

    def discard(self, upload: Upload) -> None:
        self.files.discard(upload)

    async def used(self, digest: str, size: int, uploaded_by: str | None) -> None:
        await self.store.touch_artifact(digest)

    async def exists(self, digest: str) -> bool:
        stored = await self.store.get_artifact(digest)
        return stored is not None and await self.store.artifact_has_bytes(digest, stored.size)

    async def forget(self, digest: str) -> None:
        if self.cache.drop(digest):
            metrics.ARTIFACT_CACHE_EVICTIONS.labels("deleted").inc()
        self._in_database.discard(digest)

    async def open(self, digest: str) -> BinaryIO | None:
        stored = await self.store.get_artifact(digest)
        if stored is None:
            await self.forget(digest)  # deleted (perhaps through another replica)
            return None
        async with self._lock(digest):
            file = await self._cached(digest, stored.size)
            if file is not None:
                metrics.ARTIFACT_CACHE.labels("hit").inc()
                self.cache.used(digest, stored.size)
                return file
            metrics.ARTIFACT_CACHE.labels("miss").inc()
            if not await self._fill(digest, stored.size):
                return None
            file = self.files.open(digest)
            if file is None:  # deleted meanwhile (retention here does not wait for reads)
                return None
            self.cache.used(digest, stored.size)
        await self._trim(keep=digest)
        if self.cache.total > self.cap and self.cache.drop(digest):
            metrics.ARTIFACT_CACHE_EVICTIONS.labels("cap").inc()  # alone past the cap
        return file

    async def _cached(self, digest: str, size: int) -> BinaryIO | None:
        """The cached file, if whole; a file of schema 13's days is imported first."""
        file = self.files.open(digest)
        if file is None:
            return None
        if os.fstat(file.fileno()).st_size != size:
            log.error("artifact %s: the cached file is not %d bytes: fetched again", digest, size)
            file.close()
            self.cache.drop(digest)
            return None
        if digest in self._in_database or await self.store.artifact_has_bytes(digest, size):
            self._in_database.add(digest)
            return file
        try:
            if await self.store.import_artifact_bytes(digest, self.files.path(digest)):
                log.info("artifact %s: imported into the database from this data dir", digest)
        except NotTheDigest as exc:
            log.error("artifact %s: the file here is not its bytes (%s): removed", digest, exc)
            file.close()
            self.cache.drop(digest)
            return None
        self._in_database.add(digest)
        return file

    async def _fill(self, digest: str, size: int) -> bool:
        """Fetch the artifact's chunks into the cache; False (said) if they can't be."""
        fd, temp = tempfile.mkstemp(dir=self.files.root, prefix=_FILL_PREFIX)
        hasher = hashlib.sha256()
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:

                async def write(data: bytes) -> None:
                    nonlocal written
                    written += len(data)
                    await asyncio.to_thread(_write, out, hasher, data)

                try:
                    async with self._fills:
                        chunks = await self.store.read_artifact_bytes(digest, write)
                except LookupError as exc:  # a chunk missing in the middle: never served
                    log.error("artifact %s: %s", digest, exc)
                    return False
            if chunks == 0 and size > 0:
                _once.warning(
                    "no_chunks",
                    "artifact %s is indexed, but its bytes are in no chunk: it was uploaded"
                    " before schema version 15 to a replica whose data dir holds it; read"
                    " it once through that replica to import it",
                    digest,
                )
                return False
            found = "sha256:" + hasher.hexdigest()
            if found != digest or written != size:
                log.error(
                    "artifact %s: the database's chunks are %d bytes hashing to %s: not served",
                    digest,
                    written,
                    found,
                )
                return False
            os.replace(temp, self.files.path(digest))
            self._in_database.add(digest)
            return True
        finally:
            Path(temp).unlink(missing_ok=True)  # noqa: ASYNC240 - one quick unlink

    async def _trim(self, keep: str) -> None:
        """Evict the files read least recently until the cache fits under its cap."""
        for digest in list(self.cache.entries):
            if self.cache.total <= self.cap:
                return
            if digest in (keep, EMPTY_DIGEST) or self._locks.get(digest) is not None:
                continue
            if digest not in self._in_database:
                size = self.cache.entries.get(digest, 0)
                if not await self.store.artifact_has_bytes(digest, size):
                    continue  # the only copy of a schema-13 upload: kept until imported
                self._in_database.add(digest)
            if self.cache.drop(digest):
                metrics.ARTIFACT_CACHE_EVICTIONS.labels("cap").inc()


def _write(out: Any, hasher: Any, data: bytes) -> None:
    hasher.update(data)
    out.write(data)
