"""Artifact bytes in the PostgreSQL database: artifact_chunks(digest, seq, data), pieces of
CHUNK_BYTES (the last one shorter), so that every replica reaches every artifact without
a shared data dir (docs/deployment.md, "Several replicas on one PostgreSQL database").

Chunks are written from a file that is already whole and hashed (the upload's temporary
file) in the transaction that indexes the artifact, one INSERT per chunk: a digest is
never indexed without its bytes, and no more than one chunk is in memory. They are
deleted with the index row (postgres_artifacts.delete_artifact). An artifact of no bytes
has no chunks. An artifact indexed before schema version 15 has none either until a
replica holding its file imports it (import_chunks).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from switchboard.models import ArtifactAdded
from switchboard.store import postgres_artifacts as artifacts
from switchboard.store.postgres_engine import Connection, affected

#: Bytes of one chunk (the last of an artifact may be shorter).
CHUNK_BYTES = 1024 * 1024


class QuotaFull(Exception):
    """The upload is past the quota: raised to roll back the chunks written before the
    index said so; `added` is the refusal."""

    def __init__(self, added: ArtifactAdded) -> None:
        super().__init__(added.outcome)
        self.added = added


class NotTheDigest(Exception):
    """A file's bytes hash to another digest than the one it was to be stored under."""


async def has_chunks(conn: Connection, digest: str, size: int) -> bool:
    """True if the artifact's bytes are in the database (always, for no bytes)."""
    if size == 0:
        return True
    found = await conn.fetchval(
        "SELECT 1 FROM artifact_chunks WHERE digest = $1 AND seq = 0", digest
    )
    return found is not None


async def _insert_from(conn: Connection, digest: str, file: BinaryIO) -> str:
    """Insert the file's bytes as chunks; return their digest."""
    hasher = hashlib.sha256()
    seq = 0
    while piece := await asyncio.to_thread(file.read, CHUNK_BYTES):
        hasher.update(piece)
        await conn.execute(
            # Another upload of the same bytes may be writing them too: its chunks are these.
            "INSERT INTO artifact_chunks (digest, seq, data) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            digest,
            seq,
            piece,
        )
        seq += 1
    return "sha256:" + hasher.hexdigest()


async def add_with_chunks(
    conn: Connection,
    digest: str,
    size: int,
    uploaded_by: str | None,
    quota: int | None,
    path: Path,
) -> ArtifactAdded:
    """postgres_artifacts.add_artifact, and the bytes of `path` (hashed already: `digest`)
    as chunks unless the database holds them (the same bytes again). The chunks are
    written before the index row, so that the quota's lock (held to the commit) is not
    held while they are; the index row is checked again once it is locked, since a
    deletion may have taken the chunks meanwhile. QuotaFull (all rolled back) past the
    quota."""
    if not await has_chunks(conn, digest, size):
        await _write_chunks(conn, digest, path)
    added = await artifacts.add_artifact(conn, digest, size, uploaded_by, quota)
    if added.outcome == "full":
        raise QuotaFull(added)
    if not await has_chunks(conn, digest, size):
        await _write_chunks(conn, digest, path)  # the row is ours now: no deletion races
    return added


async def _write_chunks(conn: Connection, digest: str, path: Path) -> None:
    with path.open("rb") as file:  # read in a thread, a chunk at a time
        await _insert_from(conn, digest, file)


async def import_chunks(conn: Connection, digest: str, path: Path) -> bool:
    """Store a file the data dir holds as the chunks of an artifact indexed without any
    (schema version 13 kept bytes only as files). True if imported, False if the index
    no longer has it or the chunks are there already; NotTheDigest (nothing stored) if
    the file's bytes are not the digest's."""
    size = await conn.fetchval("SELECT size FROM artifacts WHERE digest = $1 FOR UPDATE", digest)
    if size is None or await has_chunks(conn, digest, size):
        return False
    with path.open("rb") as file:  # read in a thread, a chunk at a time
        found = await _insert_from(conn, digest, file)
    if found != digest:
        raise NotTheDigest(f"{path} holds {found}, not {digest}")  # rolls the chunks back
    return True


async def read_chunks(
    conn: Connection, digest: str, write: Callable[[bytes], Awaitable[None]]
) -> int:
    """Hand the artifact's chunks in order to `write`, one at a time (one ranged select
    each); return how many there were."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM artifact_chunks WHERE digest = $1", digest
    )
    for seq in range(count):
        data = await conn.fetchval(
            "SELECT data FROM artifact_chunks WHERE digest = $1 AND seq = $2", digest, seq
        )
        if data is None:
            raise LookupError(f"artifact {digest} lacks chunk {seq} of {count}")
        await write(data)
    return count


async def touch(conn: Connection, digest: str, now: float) -> bool:
    """Count a use of a stored artifact (an upload of bytes it has); False if not indexed."""
    return bool(
        affected(
            await conn.execute("UPDATE artifacts SET last_used = $1 WHERE digest = $2", now, digest)
        )
    )
