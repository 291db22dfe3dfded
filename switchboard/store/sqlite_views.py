"""SQLite queries behind the dashboard and the admin API: the overview's counts, the job
change log the live feed follows, and the switchboard-wide state (dispatch paused)."""

from __future__ import annotations

import sqlite3

from protocol.state import Phase
from switchboard.models import (
    JobChange,
    JobFilter,
    Overview,
    QueueDepth,
    SupervisorCounts,
)
from switchboard.store import records
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL, TERMINAL_LITERALS
from switchboard.store.sqlite_jobs import list_jobs

#: Endings the overview lists as failures (a cancel or a refusal is someone's decision).
FAILURES = [Phase.FAILED, Phase.TIMED_OUT, Phase.LOST, Phase.EXHAUSTED]


def job_changes(conn: sqlite3.Connection, after_rev: int, limit: int) -> list[JobChange]:
    rows = conn.execute(
        "SELECT rev, job_id, deleted FROM job_changes WHERE rev > ? ORDER BY rev LIMIT ?",
        (after_rev, limit),
    )
    return [JobChange(rev, job_id, bool(deleted)) for rev, job_id, deleted in rows]


def latest_job_change(conn: sqlite3.Connection) -> int:
    (rev,) = conn.execute("SELECT coalesce(max(rev), 0) FROM job_changes").fetchone()
    return rev


def prune_job_changes(conn: sqlite3.Connection, keep: int) -> None:
    conn.execute(
        "DELETE FROM job_changes WHERE rev <= (SELECT coalesce(max(rev), 0) FROM job_changes) - ?",
        (keep,),
    )


def overview(conn: sqlite3.Connection, now: float, minutes: int, failures: int) -> Overview:
    online, offline, draining = conn.execute(
        "SELECT coalesce(sum(connected AND NOT drained), 0), coalesce(sum(NOT connected), 0),"
        " coalesce(sum(connected AND drained), 0) FROM supervisors"
    ).fetchone()
    queue = [
        QueueDepth(priority, count)
        for priority, count in conn.execute(
            "SELECT priority, count(*) FROM jobs WHERE phase = 'queued'"
            " GROUP BY priority ORDER BY priority DESC"
        )
    ]
    (running,) = conn.execute(
        f"SELECT count(*) FROM runs WHERE phase IN ({ACTIVE_SQL})", ACTIVE_PHASES
    ).fetchone()
    first_minute = (now // 60 - (minutes - 1)) * 60
    ended = {
        minute: (succeeded, failed)
        for minute, succeeded, failed in conn.execute(
            "SELECT (CAST(updated_at / 60 AS INTEGER)) * 60 AS minute,"
            " sum(phase = 'succeeded'), sum(phase != 'succeeded')"
            f" FROM jobs WHERE phase IN ({TERMINAL_LITERALS}) AND updated_at >= ? GROUP BY minute",
            (first_minute,),
        )
    }
    finished = records.finished_minutes(ended, first_minute, minutes)
    recent = list_jobs(conn, JobFilter(phases=[p.value for p in FAILURES], limit=failures))
    return Overview(
        supervisors=SupervisorCounts(online, offline, draining),
        queue=queue,
        running=running,
        finished=finished,
        recent_failures=[summary for _, summary in recent],
    )


def dispatch_paused(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT value FROM switchboard_state WHERE key = 'dispatch_paused'"
    ).fetchone()
    return row is not None and row[0] == "1"


def set_dispatch_paused(conn: sqlite3.Connection, paused: bool) -> None:
    conn.execute(
        "INSERT INTO switchboard_state (key, value) VALUES ('dispatch_paused', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        ("1" if paused else "0",),
    )
