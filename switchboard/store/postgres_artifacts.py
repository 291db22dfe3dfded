"""The artifacts index of the PostgreSQL store (sqlite_artifacts.py's SQL, translated):
what is stored, who uploaded it, which jobs name it. The bytes are chunks beside the
index (postgres_chunks.py), deleted with it. Every function runs inside the caller's
transaction.
"""

from __future__ import annotations

import time

from protocol.limits import EMPTY_DIGEST
from switchboard.models import ArtifactAdded, ArtifactDeleted, ArtifactView
from switchboard.store.postgres_engine import Connection, affected
from switchboard.store.schema import TERMINAL_LITERALS
from switchboard.store.sqlite_artifacts import NEEDED_BY_SHOWN


async def stored_artifact_bytes(conn: Connection) -> int:
    total: int = await conn.fetchval("SELECT coalesce(sum(size), 0)::bigint FROM artifacts")
    return total


async def add_artifact(
    conn: Connection, digest: str, size: int, uploaded_by: str | None, quota: int | None
) -> ArtifactAdded:
    """sqlite_artifacts.add_artifact. Uploads are counted against the quota one at a
    time (a transaction-scoped lock), so two replicas can't both take the last bytes."""
    now = time.time()
    if quota is not None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('switchboard artifacts'))")
    stored = await stored_artifact_bytes(conn)
    if affected(
        await conn.execute("UPDATE artifacts SET last_used = $1 WHERE digest = $2", now, digest)
    ):
        return ArtifactAdded("exists", stored)
    if quota is not None and stored + size > quota:
        return ArtifactAdded("full", stored)
    # A racing upload of the same bytes may have made the row first: a use, then.
    await conn.execute(
        "INSERT INTO artifacts (digest, size, created_at, uploaded_by) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (digest) DO UPDATE SET last_used = excluded.created_at",
        digest,
        size,
        now,
        uploaded_by,
    )
    return ArtifactAdded("added", stored + size)


async def get_artifact(conn: Connection, digest: str) -> ArtifactView | None:
    row = await conn.fetchrow(
        "SELECT digest, size, created_at, uploaded_by, last_used FROM artifacts WHERE digest = $1",
        digest,
    )
    return ArtifactView(*row) if row else None


async def _needed_by(conn: Connection, digest: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT j.id FROM jobs j WHERE j.id IN (SELECT ja.job_id FROM job_artifacts ja"
        f" WHERE ja.digest = $1) AND j.phase NOT IN ({TERMINAL_LITERALS})"
        " UNION SELECT DISTINCT rf.job_id FROM run_files rf WHERE rf.digest = $1 LIMIT $2",
        digest,
        NEEDED_BY_SHOWN,
    )
    return sorted(row[0] for row in rows)


#: sqlite_artifacts._UNUSED_SINCE: true for an artifact (`a`) no job needs and nobody
#: used at or after $1.
_UNUSED_SINCE = (
    "greatest(a.created_at, coalesce(a.last_used, 0)) < $1 AND NOT EXISTS (SELECT 1"
    " FROM job_artifacts ja JOIN jobs j ON j.id = ja.job_id WHERE ja.digest = a.digest"
    f" AND (j.phase NOT IN ({TERMINAL_LITERALS}) OR j.updated_at >= $1))"
    " AND NOT EXISTS (SELECT 1 FROM run_files rf WHERE rf.digest = a.digest)"
    f" AND a.digest != '{EMPTY_DIGEST}'"  # always kept (sqlite_artifacts)
)


async def unused_artifacts(conn: Connection, unused_before: float, limit: int) -> list[str]:
    rows = await conn.fetch(
        f"SELECT a.digest FROM artifacts a WHERE {_UNUSED_SINCE}"
        " ORDER BY greatest(a.created_at, coalesce(a.last_used, 0)) LIMIT $2",
        unused_before,
        limit,
    )
    return [row[0] for row in rows]


async def delete_artifact(
    conn: Connection, digest: str, unused_before: float | None
) -> ArtifactDeleted:
    """sqlite_artifacts.delete_artifact; the artifact's row is locked first, so a
    submission naming it (which updates it) waits for the decision or comes before it."""
    if await conn.fetchval("SELECT 1 FROM artifacts WHERE digest = $1 FOR UPDATE", digest) is None:
        return ArtifactDeleted("absent")
    if digest == EMPTY_DIGEST:
        return ArtifactDeleted("always_kept")
    needed_by = await _needed_by(conn, digest)
    if needed_by:
        return ArtifactDeleted("in_use", needed_by)
    if unused_before is not None:
        unused = await conn.fetchval(
            f"SELECT 1 FROM artifacts a WHERE a.digest = $2 AND {_UNUSED_SINCE}",
            unused_before,
            digest,
        )
        if unused is None:
            return ArtifactDeleted("used_lately")
    await conn.execute("DELETE FROM artifacts WHERE digest = $1", digest)
    await conn.execute("DELETE FROM artifact_chunks WHERE digest = $1", digest)
    return ArtifactDeleted("deleted")
