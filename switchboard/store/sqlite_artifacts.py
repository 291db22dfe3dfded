"""The artifacts index of the SQLite store: what is stored, who uploaded it, which jobs name
it. Every function takes the open connection and runs inside the caller's transaction.

An artifact is *needed* while a job naming it has not ended, or while a job that kept it
as an output file of one of its runs exists (run_files: deleting the job, by hand or by
retention, drops the link); it is *used lately* if it was uploaded, named by a submitted
job, or named by a job that ended, after a given time.
"""

from __future__ import annotations

import sqlite3
import time

from protocol.limits import EMPTY_DIGEST
from switchboard.models import ArtifactAdded, ArtifactDeleted, ArtifactView
from switchboard.store.schema import TERMINAL_LITERALS, TERMINAL_PHASES, TERMINAL_SQL

#: Jobs named in a refusal to delete an artifact a job still needs.
NEEDED_BY_SHOWN = 5


def stored_artifact_bytes(conn: sqlite3.Connection) -> int:
    (total,) = conn.execute("SELECT coalesce(sum(size), 0) FROM artifacts").fetchone()
    return total


def add_artifact(
    conn: sqlite3.Connection, digest: str, size: int, uploaded_by: str | None, quota: int | None
) -> ArtifactAdded:
    """Index an upload; refused ("full") if it would take the artifacts past `quota`
    bytes. The same bytes again are "exists" (the upload counts as a use)."""
    now = time.time()
    stored = stored_artifact_bytes(conn)
    if conn.execute("UPDATE artifacts SET last_used = ? WHERE digest = ?", (now, digest)).rowcount:
        return ArtifactAdded("exists", stored)
    if quota is not None and stored + size > quota:
        return ArtifactAdded("full", stored)
    conn.execute(
        "INSERT INTO artifacts (digest, size, created_at, uploaded_by) VALUES (?, ?, ?, ?)",
        (digest, size, now, uploaded_by),
    )
    return ArtifactAdded("added", stored + size)


def get_artifact(conn: sqlite3.Connection, digest: str) -> ArtifactView | None:
    row = conn.execute(
        "SELECT digest, size, created_at, uploaded_by, last_used FROM artifacts WHERE digest = ?",
        (digest,),
    ).fetchone()
    return ArtifactView(*row) if row else None


def _needed_by(conn: sqlite3.Connection, digest: str) -> list[str]:
    """The jobs that hold the artifact: naming it and not ended, or keeping it as a file."""
    rows = conn.execute(
        "SELECT j.id FROM jobs j WHERE j.id IN (SELECT ja.job_id FROM job_artifacts ja"
        f" WHERE ja.digest = ?) AND j.phase NOT IN ({TERMINAL_SQL})"
        " UNION SELECT DISTINCT rf.job_id FROM run_files rf WHERE rf.digest = ? LIMIT ?",
        (digest, *TERMINAL_PHASES, digest, NEEDED_BY_SHOWN),
    ).fetchall()
    return sorted(row[0] for row in rows)


#: True for an artifact (`a`) no job needs and nobody used at or after the parameter.
_UNUSED_SINCE = (
    "max(a.created_at, coalesce(a.last_used, 0)) < :since AND NOT EXISTS (SELECT 1"
    " FROM job_artifacts ja JOIN jobs j ON j.id = ja.job_id WHERE ja.digest = a.digest"
    f" AND (j.phase NOT IN ({TERMINAL_LITERALS})"
    " OR j.updated_at >= :since))"
    " AND NOT EXISTS (SELECT 1 FROM run_files rf WHERE rf.digest = a.digest)"
    # The empty artifact is always kept (protocol.limits.EMPTY_DIGEST; migration 10).
    f" AND a.digest != '{EMPTY_DIGEST}'"
)


def unused_artifacts(conn: sqlite3.Connection, unused_before: float, limit: int) -> list[str]:
    """Artifacts no job needs and nobody used since `unused_before`, least recently used
    first."""
    rows = conn.execute(
        f"SELECT a.digest FROM artifacts a WHERE {_UNUSED_SINCE}"
        " ORDER BY max(a.created_at, coalesce(a.last_used, 0)) LIMIT :limit",
        {"since": unused_before, "limit": limit},
    ).fetchall()
    return [row[0] for row in rows]


def delete_artifact(
    conn: sqlite3.Connection, digest: str, unused_before: float | None
) -> ArtifactDeleted:
    """Forget an artifact unless a job needs it (or, given `unused_before`, it was used
    since then)."""
    if get_artifact(conn, digest) is None:
        return ArtifactDeleted("absent")
    if digest == EMPTY_DIGEST:
        return ArtifactDeleted("always_kept")
    needed_by = _needed_by(conn, digest)
    if needed_by:
        return ArtifactDeleted("in_use", needed_by)
    if unused_before is not None:
        unused = conn.execute(
            f"SELECT 1 FROM artifacts a WHERE a.digest = :digest AND {_UNUSED_SINCE}",
            {"digest": digest, "since": unused_before},
        ).fetchone()
        if unused is None:
            return ArtifactDeleted("used_lately")
    conn.execute("DELETE FROM artifacts WHERE digest = ?", (digest,))
    return ArtifactDeleted("deleted")
