"""What retention reads and deletes in the SQLite store (policy: switchboard.retention).

Every function takes the open connection and runs inside the caller's transaction. The
deleting ones do a bounded amount of work per call, so the one writer is never held long.
"""

from __future__ import annotations

import sqlite3

from switchboard.store import records
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL, TERMINAL_PHASES, TERMINAL_SQL
from switchboard.store.sqlite_jobs import record_event


def stored_output_bytes(conn: sqlite3.Connection) -> int:
    (total,) = conn.execute("SELECT coalesce(sum(output_bytes), 0) FROM runs").fetchone()
    return total


def ended_jobs(
    conn: sqlite3.Connection, ended_before: float | None, with_output: bool, limit: int
) -> list[str]:
    """Ended jobs, the one that ended first first: those that ended before `ended_before`
    (if given) and, with `with_output`, only those that still hold output."""
    clauses = [f"j.phase IN ({TERMINAL_SQL})"]
    args: list[object] = [*TERMINAL_PHASES]
    if ended_before is not None:
        clauses.append("j.updated_at < ?")
        args.append(ended_before)
    if with_output:
        clauses.append("EXISTS (SELECT 1 FROM runs r WHERE r.job_id = j.id AND r.output_bytes > 0)")
    # A terminal job is never updated again: updated_at is when it ended (index jobs_ended).
    rows = conn.execute(
        f"SELECT j.id FROM jobs j WHERE {' AND '.join(clauses)} ORDER BY j.updated_at LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [row[0] for row in rows]


def drop_output(conn: sqlite3.Connection, job_id: str, max_rows: int, reason: str | None) -> int:
    """Delete up to `max_rows` chunks of an ended job's output; return the bytes freed (0:
    none was left, or the job is not ended). The call that deletes the last chunk writes
    `reason` (if given) into the job's events."""
    row = conn.execute(
        f"SELECT 1 FROM jobs WHERE id = ? AND phase IN ({TERMINAL_SQL}) AND NOT EXISTS"
        f" (SELECT 1 FROM runs WHERE job_id = ? AND phase IN ({ACTIVE_SQL}))",
        (job_id, *TERMINAL_PHASES, job_id, *ACTIVE_PHASES),
    ).fetchone()
    if row is None:
        return 0
    deleted = conn.execute(
        "DELETE FROM output WHERE id IN (SELECT id FROM output WHERE job_id = ? LIMIT ?)"
        " RETURNING attempt, length(data)",
        (job_id, max_rows),
    ).fetchall()
    freed = records.freed_by_attempt(deleted)
    for attempt, size in freed.items():
        conn.execute(
            "UPDATE runs SET output_bytes = max(output_bytes - ?, 0)"
            " WHERE job_id = ? AND attempt = ?",
            (size, job_id, attempt),
        )
    if len(deleted) < max_rows:
        # Nothing is left (the count may have missed chunks stored before it was kept).
        conn.execute("UPDATE runs SET output_bytes = 0 WHERE job_id = ?", (job_id,))
        if deleted and reason is not None:
            record_event(conn, job_id, "output_removed", reason)
    return sum(freed.values())
