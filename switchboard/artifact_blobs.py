"""Artifact bytes as the API, retention and the report parser see them, whichever store
holds the index: one interface (ArtifactBlobs), two implementations.

- FileBlobs (SQLite): the files of the data dir (switchboard.artifacts) are the store.
- PostgresBlobs (switchboard.postgres_blobs): the database holds the bytes in chunks, and
  each replica keeps a bounded cache of them as files in its own data dir.

Either way an upload streams into a temporary file of the data dir while it is hashed
(its digest is known only at its end); `keep` then indexes it and stores its bytes in one
step, or refuses it (the quota), and `open` hands back an open file a download reads from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import BinaryIO, Protocol

from switchboard.artifacts import ArtifactFiles, Upload
from switchboard.config import Settings
from switchboard.models import ArtifactAdded
from switchboard.store.base import Store

log = logging.getLogger("switchboard.artifacts")


class ArtifactBlobs(Protocol):
    #: The data dir's artifacts directory: uploads' temporary files, partial uploads
    #: (switchboard.uploads), and the artifact files themselves or their cache.
    files: ArtifactFiles

    async def receive(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Upload:
        """Hash an upload into a temporary file (artifacts.ArtifactFiles.receive)."""
        ...

    async def keep(
        self, upload: Upload, uploaded_by: str | None, quota: int | None
    ) -> ArtifactAdded:
        """Index the upload and store its bytes, together; "full" (nothing stored) past
        `quota`. The temporary file is used up unless refused: `discard` it after."""
        ...

    def discard(self, upload: Upload) -> None: ...

    async def used(self, digest: str, size: int, uploaded_by: str | None) -> None:
        """An upload of bytes stored already: counted as a use (for retention)."""
        ...

    async def exists(self, digest: str) -> bool:
        """True if the artifact's bytes are stored (a resumable upload need not send them)."""
        ...

    async def open(self, digest: str) -> BinaryIO | None:
        """The artifact's bytes as an open file (read from it: a deletion meanwhile does
        not cut a download short), or None if it is not stored."""
        ...

    async def forget(self, digest: str) -> None:
        """The artifact was deleted from the index (or never was in it): its bytes here go."""
        ...


class FileBlobs:
    """The SQLite store's artifacts: files of the data dir, the store keeping the index."""

    def __init__(self, store: Store, files: ArtifactFiles) -> None:
        self.store = store
        self.files = files

    async def receive(self, chunks: AsyncIterator[bytes], max_bytes: int) -> Upload:
        return await self.files.receive(chunks, max_bytes)

    async def keep(
        self, upload: Upload, uploaded_by: str | None, quota: int | None
    ) -> ArtifactAdded:
        added = await self.store.add_artifact(upload.digest, upload.size, uploaded_by, quota)
        if added.outcome != "full":
            self.files.keep(upload)  # indexed first: a file is never there unindexed
        return added

    def discard(self, upload: Upload) -> None:
        self.files.discard(upload)

    async def used(self, digest: str, size: int, uploaded_by: str | None) -> None:
        await self.store.add_artifact(digest, size, uploaded_by)

    async def exists(self, digest: str) -> bool:
        return self.files.exists(digest)

    async def open(self, digest: str) -> BinaryIO | None:
        return self.files.open(digest)

    async def forget(self, digest: str) -> None:
        self.files.remove(digest)


def make_blobs(store: Store, settings: Settings) -> ArtifactBlobs:
    """The artifact bytes of `store`: in PostgreSQL if it is one, else files."""
    files = ArtifactFiles(settings.artifacts_dir)
    if settings.database is not None:
        from switchboard.postgres_blobs import PostgresBlobs  # asyncpg only when asked
        from switchboard.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore), "a --database store is a PostgresStore"
        return PostgresBlobs(store, files, settings.artifact_cache_bytes)
    return FileBlobs(store, files)


async def sweep_uploads(files: ArtifactFiles, every_s: float) -> None:
    """Remove this data dir's leftover upload files every `every_s` (retention does it on
    the leader; each replica of a PostgreSQL store has a data dir of its own)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            removed = files.remove_stale_uploads()
        except OSError:
            log.exception("removing leftover upload files failed")
            continue
        if removed:
            log.info("removed %d leftover upload files", removed)
