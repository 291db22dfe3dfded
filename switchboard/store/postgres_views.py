"""PostgreSQL queries behind the dashboard, the admin API and retention
(sqlite_views.py's and sqlite_retention.py's SQL, translated): the overview's counts, the
job change log the live feed follows, dispatch paused, and what retention reads and
deletes. Every function runs inside the caller's transaction.
"""

from __future__ import annotations

import itertools

from switchboard.models import JobChange, JobFilter, Overview, QueueDepth, SupervisorCounts
from switchboard.store import records
from switchboard.store.postgres_engine import Connection
from switchboard.store.postgres_jobs import list_jobs, record_event
from switchboard.store.schema import ACTIVE_LITERALS, TERMINAL_LITERALS
from switchboard.store.sqlite_views import FAILURES

# --- the job change log ---------------------------------------------------------------


# Revs come from a sequence, drawn when a job changes, not when its transaction commits:
# with writers side by side, rev 8 may be seen before rev 7 commits. A reader that moved
# past 7 would never see it. So a reader stops at a missing rev while a transaction that
# was running when the gap was first seen still runs (it may hold that rev); once all of
# those have ended, the rev was rolled back (or pruned) and is passed over.

#: The transactions running in the reader's snapshot.
_IN_FLIGHT = (
    "SELECT coalesce(array_agg(x::text), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) x"
)


async def _in_flight(conn: Connection) -> frozenset[str]:
    return frozenset(await conn.fetchval(_IN_FLIGHT))


async def job_changes(
    conn: Connection, after_rev: int, limit: int, gaps: dict[int, frozenset[str]]
) -> list[JobChange]:
    """Changes after `after_rev` up to the first gap that may still fill. `gaps`: the
    caller's memory of the gaps seen (first missing rev -> transactions running then)."""
    rows = await conn.fetch(
        "SELECT rev, job_id, deleted FROM job_changes WHERE rev > $1 ORDER BY rev LIMIT $2",
        after_rev,
        limit,
    )
    running = await _in_flight(conn) if rows else frozenset()
    changes, expected = [], after_rev + 1
    for rev, job_id, deleted in rows:
        if rev != expected:
            holders = gaps.setdefault(expected, running)
            if holders & running:
                break  # may still commit: read from here next time
            del gaps[expected]
        changes.append(JobChange(rev, job_id, bool(deleted)))
        expected = rev + 1
    return changes


async def latest_job_change(conn: Connection) -> int:
    """Where a new follower starts: the newest rev, or the last before a gap in the
    newest thousand while other transactions run (one of them may fill it: a change
    read twice does no harm, one missed does)."""
    revs = [
        row[0]
        for row in await conn.fetch(
            "SELECT rev FROM job_changes"
            " WHERE rev > (SELECT coalesce(max(rev), 0) FROM job_changes) - 1000 ORDER BY rev"
        )
    ]
    if not revs:
        return 0
    if await _in_flight(conn):
        for before, after in itertools.pairwise(revs):
            if after != before + 1:
                return int(before)
    return int(revs[-1])


async def prune_job_changes(conn: Connection, keep: int) -> None:
    await conn.execute(
        "DELETE FROM job_changes WHERE rev <= (SELECT coalesce(max(rev), 0) FROM job_changes) - $1",
        keep,
    )


# --- the overview ---------------------------------------------------------------------


async def overview(conn: Connection, now: float, minutes: int, failures: int) -> Overview:
    fleet = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE connected = 1 AND drained = 0),"
        " count(*) FILTER (WHERE connected = 0),"
        " count(*) FILTER (WHERE connected = 1 AND drained = 1) FROM supervisors"
    )
    assert fleet is not None  # aggregates always give a row
    online, offline, draining = fleet
    queue = [
        QueueDepth(priority, count)
        for priority, count in await conn.fetch(
            "SELECT priority, count(*) FROM jobs WHERE phase = 'queued'"
            " GROUP BY priority ORDER BY priority DESC"
        )
    ]
    running = await conn.fetchval(f"SELECT count(*) FROM runs WHERE phase IN ({ACTIVE_LITERALS})")
    first_minute = (now // 60 - (minutes - 1)) * 60
    ended = {
        int(minute): (succeeded, failed)
        for minute, succeeded, failed in await conn.fetch(
            "SELECT floor(updated_at / 60)::bigint * 60 AS minute,"
            " count(*) FILTER (WHERE phase = 'succeeded'),"
            " count(*) FILTER (WHERE phase != 'succeeded')"
            f" FROM jobs WHERE phase IN ({TERMINAL_LITERALS}) AND updated_at >= $1"
            " GROUP BY minute",
            first_minute,
        )
    }
    recent = await list_jobs(conn, JobFilter(phases=[p.value for p in FAILURES], limit=failures))
    return Overview(
        supervisors=SupervisorCounts(online, offline, draining),
        queue=queue,
        running=running,
        finished=records.finished_minutes(ended, first_minute, minutes),
        recent_failures=[summary for _, summary in recent],
    )


# --- switchboard-wide state -----------------------------------------------------------


async def dispatch_paused(conn: Connection) -> bool:
    value = await conn.fetchval("SELECT value FROM switchboard_state WHERE key = 'dispatch_paused'")
    return value == "1"


async def set_dispatch_paused(conn: Connection, paused: bool) -> None:
    await conn.execute(
        "INSERT INTO switchboard_state (key, value) VALUES ('dispatch_paused', $1)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        "1" if paused else "0",
    )


# --- retention (the policy: switchboard.retention) ------------------------------------


async def stored_output_bytes(conn: Connection) -> int:
    total: int = await conn.fetchval("SELECT coalesce(sum(output_bytes), 0)::bigint FROM runs")
    return total


async def ended_jobs(
    conn: Connection, ended_before: float | None, with_output: bool, limit: int
) -> list[str]:
    clauses = [f"j.phase IN ({TERMINAL_LITERALS})"]
    args: list[object] = [limit]
    if ended_before is not None:
        args.append(ended_before)
        clauses.append("j.updated_at < $2")
    if with_output:
        clauses.append("EXISTS (SELECT 1 FROM runs r WHERE r.job_id = j.id AND r.output_bytes > 0)")
    # A terminal job is never updated again: updated_at is when it ended (index jobs_ended).
    rows = await conn.fetch(
        f"SELECT j.id FROM jobs j WHERE {' AND '.join(clauses)} ORDER BY j.updated_at LIMIT $1",
        *args,
    )
    return [row[0] for row in rows]


async def drop_output(conn: Connection, job_id: str, max_rows: int, reason: str | None) -> int:
    """sqlite_retention.drop_output: up to `max_rows` chunks of an ended job's output."""
    ended = await conn.fetchval(
        f"SELECT 1 FROM jobs WHERE id = $1 AND phase IN ({TERMINAL_LITERALS}) AND NOT EXISTS"
        f" (SELECT 1 FROM runs WHERE job_id = $1 AND phase IN ({ACTIVE_LITERALS}))",
        job_id,
    )
    if ended is None:
        return 0
    deleted = await conn.fetch(
        "DELETE FROM output WHERE id IN (SELECT id FROM output WHERE job_id = $1 LIMIT $2)"
        " RETURNING attempt, octet_length(data)",
        job_id,
        max_rows,
    )
    freed = records.freed_by_attempt(deleted)
    if freed:
        await conn.executemany(
            "UPDATE runs SET output_bytes = greatest(output_bytes - $1, 0)"
            " WHERE job_id = $2 AND attempt = $3",
            [(size, job_id, attempt) for attempt, size in freed.items()],
        )
    if len(deleted) < max_rows:
        await conn.execute("UPDATE runs SET output_bytes = 0 WHERE job_id = $1", job_id)
        if deleted and reason is not None:
            await record_event(conn, job_id, "output_removed", reason)
    return sum(freed.values())
