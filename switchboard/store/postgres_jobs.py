"""Job transactions of the PostgreSQL store (sqlite_jobs.py's, translated): submission
with concurrency policies, cancel, listing, the audit trail, deletion.

Every function takes the connection and runs inside the caller's transaction. Where two
replicas could race for a job, its row is locked (FOR UPDATE) before it is read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import msgspec

from protocol.state import Phase
from switchboard import lifecycle
from switchboard.artifacts import named_artifacts
from switchboard.lifecycle import AuditEntry
from switchboard.models import (
    CancelResult,
    JobEvent,
    JobFilter,
    JobSummary,
    JobView,
    RunOnSupervisor,
    Submitted,
)
from switchboard.store import records
from switchboard.store.errors import ArtifactMissing, QueueFull, QueueQuotaFull
from switchboard.store.postgres_engine import Connection, affected
from switchboard.store.schema import ACTIVE_LITERALS, TERMINAL_LITERALS
from switchboard.store.sqlite_jobs import NewJob

_encoder = msgspec.json.Encoder()

_INSERT_EVENT = (
    "INSERT INTO job_events (job_id, at, kind, message, attempt, actor)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)


async def record_event(
    conn: Connection,
    job_id: str,
    kind: str,
    message: str,
    *,
    attempt: int | None = None,
    actor: str | None = None,
) -> None:
    await conn.execute(_INSERT_EVENT, job_id, time.time(), kind, message, attempt, actor or None)


async def record_events(conn: Connection, job_id: str, events: Sequence[AuditEntry]) -> None:
    """Write the audit entries a lifecycle decision came with."""
    if events:
        await conn.executemany(
            _INSERT_EVENT,
            [(job_id, e.at, e.kind, e.message, e.attempt, e.actor or None) for e in events],
        )


async def note_artifact_use(conn: Connection, job_id: str, digest: str, now: float) -> bool:
    """Note a use of an artifact by a job (it holds it now); False if it is not stored."""
    if not affected(
        await conn.execute("UPDATE artifacts SET last_used = $1 WHERE digest = $2", now, digest)
    ):
        return False
    await conn.execute(
        "INSERT INTO job_artifacts (digest, job_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        digest,
        job_id,
    )
    return True


#: How close to a queue limit submissions count the queue one at a time: within a tenth
#: of it, or within this many jobs of it, whichever is more. Further from it, submissions
#: side by side could together pass the limit only by having more than that in flight at
#: once (docs/deployment.md, "PostgreSQL").
EXACT_WITHIN_JOBS = 1000


def _near_limit(queued: int, adding: int, limit: int) -> bool:
    return queued + adding > limit - max(limit // 10, EXACT_WITHIN_JOBS)


async def _queue_counts(conn: Connection, owner: str | None) -> tuple[int, int]:
    """The jobs queued, and those of them `owner`'s (0 without an owner)."""
    row = await conn.fetchrow(
        "SELECT count(*), count(*) FILTER (WHERE owner = $1) FROM jobs WHERE phase = 'queued'",
        owner,
    )
    assert row is not None  # an aggregate always has its row
    return row[0], row[1]


async def insert_jobs(
    conn: Connection,
    jobs: list[NewJob],
    actor: str,
    max_queued: int,
    *,
    owner: str | None = None,
    max_per_owner: int | None = None,
) -> list[Submitted]:
    """Insert jobs owned by token `owner` (all or none: the caller's transaction rolls
    back on QueueFull or ArtifactMissing). Near a queue limit, submissions count the queue
    one at a time (an exclusive lock held until commit), so two side by side can't both
    take its last places; further from it they go side by side under a shared lock (which
    the exclusive one waits for), so their commits share a WAL flush instead of each
    waiting for the one before it."""
    queued, mine = await _queue_counts(conn, owner)
    if _near_limit(queued, len(jobs), max_queued) or (
        max_per_owner is not None and _near_limit(mine, len(jobs), max_per_owner)
    ):
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('switchboard queue'))")
        queued, mine = await _queue_counts(conn, owner)
    else:
        await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext('switchboard queue'))")
    if queued + len(jobs) > max_queued:
        raise QueueFull(f"{queued} jobs are queued; the switchboard takes at most {max_queued}")
    if owner is not None and max_per_owner is not None and mine + len(jobs) > max_per_owner:
        raise QueueQuotaFull(
            f"this token has {mine} jobs queued; one token may have at most"
            f" {max_per_owner} (the switchboard's --max-queued-per-token)"
        )
    made = []
    now = time.time()
    for index, job in enumerate(jobs):
        # In the same transaction: an artifact can't be deleted between check and insert.
        for field, digest in named_artifacts(job.spec):
            if not await note_artifact_use(conn, job.id, digest, now):
                raise ArtifactMissing(index, field, digest)
        made.append(await _insert_job(conn, job, actor, owner))
    return made


async def _insert_job(conn: Connection, job: NewJob, actor: str, owner: str | None) -> Submitted:
    job_id, spec = job.id, job.spec
    now = time.time()
    key = spec.concurrency.key if spec.concurrency else None
    holders = (
        [
            row[0]
            for row in await conn.fetch(
                "SELECT id FROM jobs WHERE concurrency_key = $1"
                f" AND phase NOT IN ({TERMINAL_LITERALS}) ORDER BY seq FOR UPDATE",
                key,
            )
        ]
        if key is not None
        else []
    )
    start = lifecycle.on_submit(
        spec.name, spec.concurrency, holders, spec.queue_timeout_s, actor, now
    )
    stops = []
    for holder in start.replaces:
        result = await cancel_job(conn, holder, actor, lifecycle.replaced_by(job_id))
        if result and result.supervisor_id is not None and result.attempt is not None:
            stops.append(RunOnSupervisor(holder, result.attempt, result.supervisor_id))
    await conn.execute(
        "INSERT INTO jobs (id, name, spec, phase, priority, labels, resources, concurrency_key,"
        " timeout_s, queued_at, queue_deadline, reason, created_at, updated_at, owner,"
        " reservation)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        job_id,
        spec.name,
        _encoder.encode(spec),
        start.phase.value,
        spec.priority,
        json.dumps(spec.labels),
        json.dumps(spec.resources),
        key,
        spec.timeout_s,
        now,
        start.queue_deadline,
        start.reason,
        now,
        now,
        owner,
        spec.reservation,
    )
    if job.sealed is not None and start.keep_secrets:
        await conn.execute(
            "INSERT INTO job_secrets (job_id, sealed) VALUES ($1, $2)", job_id, job.sealed
        )
    await record_events(conn, job_id, start.events)
    return Submitted(job_id, start.phase.value, start.reason, stops)


async def cancel_job(
    conn: Connection, job_id: str, actor: str, why: str = "canceled"
) -> CancelResult | None:
    """Cancel as switchboard.lifecycle.on_cancel decides; names the run to stop, if any."""
    row = await conn.fetchrow("SELECT phase, attempts FROM jobs WHERE id = $1 FOR UPDATE", job_id)
    if row is None:
        return None
    phase, attempts = Phase(row[0]), row[1]
    now = time.time()
    cancel = lifecycle.on_cancel(phase, why, actor, now)
    if cancel is None:
        return CancelResult(phase.value)
    await record_events(conn, job_id, [cancel.event])
    await conn.execute(
        "UPDATE jobs SET phase = $1, cancel_requested = 1, reason = $2, updated_at = $3,"
        " queue_deadline = NULL, waiting_for = NULL WHERE id = $4",
        cancel.phase.value,
        cancel.reason,
        now,
        job_id,
    )
    if not cancel.stop_run:
        return CancelResult(cancel.phase.value)
    supervisor_id = await conn.fetchval(
        "SELECT supervisor_id FROM runs WHERE job_id = $1 AND attempt = $2", job_id, attempts
    )
    return CancelResult(phase.value, supervisor_id, attempts)


async def end_queued_job(conn: Connection, job_id: str, end: lifecycle.JobEnd) -> None:
    """End a queued job before any run, as the lifecycle decided."""
    await conn.execute(
        "UPDATE jobs SET phase = $1, reason = $2, queue_deadline = NULL, unschedulable = NULL,"
        " not_before = NULL, waiting_for = NULL, updated_at = $3 WHERE id = $4",
        end.phase.value,
        end.reason,
        end.event.at,
        job_id,
    )
    await record_events(conn, job_id, [end.event])


async def list_jobs(conn: Connection, where: JobFilter) -> list[tuple[int, JobSummary]]:
    clauses: list[str] = []
    args: list[object] = []

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    if where.phases:
        clauses.append(f"j.phase = ANY({arg(list(where.phases))}::text[])")
    for term in where.labels:
        if term.op == "=":
            clauses.append(f"j.labels ->> {arg(term.key)} = {arg(term.value)}")
        elif term.op == "!=":
            clauses.append(f"coalesce(j.labels ->> {arg(term.key)} != {arg(term.value)}, true)")
        elif term.op == "exists":
            clauses.append(f"jsonb_exists(j.labels, {arg(term.key)})")
        else:
            clauses.append(f"NOT jsonb_exists(j.labels, {arg(term.key)})")
    if where.supervisor_id is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM runs r WHERE r.job_id = j.id"
            f" AND r.supervisor_id = {arg(where.supervisor_id)})"
        )
    if where.created_after is not None:
        clauses.append(f"j.created_at >= {arg(where.created_after)}")
    if where.created_before is not None:
        clauses.append(f"j.created_at < {arg(where.created_before)}")
    if where.before_seq is not None:
        clauses.append(f"j.seq < {arg(where.before_seq)}")
    if where.ids:
        clauses.append(f"j.id = ANY({arg(list(where.ids))}::text[])")
    if where.owner is not None:
        clauses.append(f"j.owner = {arg(where.owner)}")
    if where.text:
        # SQLite's LIKE ignores the case of ASCII letters: ILIKE, as near as it gets.
        pattern = where.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append(f"(j.name ILIKE {arg(f'%{pattern}%')} OR j.id ILIKE {arg(f'{pattern}%')})")
    sql = f"SELECT {records.SUMMARY_COLUMNS} FROM jobs j"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY j.seq DESC LIMIT {arg(where.limit)}"
    return [records.job_summary(r) for r in await conn.fetch(sql, *args)]


_PHASES_OF_JOB = f"SELECT {records.PHASE_COLUMNS} FROM run_phases WHERE job_id = $1 ORDER BY id"


async def job_events(conn: Connection, job_id: str) -> list[JobEvent] | None:
    """The job's own events and its runs' phase changes, in time order."""
    if await conn.fetchval("SELECT 1 FROM jobs WHERE id = $1", job_id) is None:
        return None
    return records.job_events(
        await conn.fetch(
            f"SELECT {records.EVENT_COLUMNS} FROM job_events WHERE job_id = $1 ORDER BY id",
            job_id,
        ),
        await conn.fetch(_PHASES_OF_JOB, job_id),
    )


async def expire_queued(conn: Connection, now: float) -> list[str]:
    """End every queued job past its queue deadline, as the lifecycle says (rows another
    writer holds are left to the next pass)."""
    rows = await conn.fetch(
        "SELECT id FROM jobs WHERE queue_deadline <= $1 AND phase = 'queued'"
        " FOR UPDATE SKIP LOCKED",
        now,
    )
    jobs = [r[0] for r in rows]
    for job_id in jobs:
        await end_queued_job(conn, job_id, lifecycle.queue_timed_out(now))
    return jobs


async def load_job(conn: Connection, job_id: str) -> JobView | None:
    row = await conn.fetchrow(
        f"SELECT {records.JOB_COLUMNS} FROM jobs j LEFT JOIN tokens t ON t.id = j.owner"
        " WHERE j.id = $1",
        job_id,
    )
    if row is None:
        return None
    return records.job_view(
        row,
        await conn.fetch(
            f"SELECT {records.RUN_COLUMNS} FROM runs WHERE job_id = $1 ORDER BY attempt", job_id
        ),
        await conn.fetch(_PHASES_OF_JOB, job_id),
        await conn.fetch(
            "SELECT attempt, device_id, role FROM run_devices WHERE job_id = $1"
            ' ORDER BY attempt, pos, device_id COLLATE "C"',
            job_id,
        ),
    )


#: What a job's delete takes with it (the job's row last).
_JOB_TABLES = (
    "output",
    "run_phases",
    "runs",
    "job_events",
    "job_artifacts",
    "test_cases",
    "test_reports",
    # the links keeping its output files' artifacts (retention takes them after)
    "run_files",
    "run_files_refused",
    "run_devices",
)


async def delete_job(conn: Connection, job_id: str) -> str:
    phase = await conn.fetchval("SELECT phase FROM jobs WHERE id = $1 FOR UPDATE", job_id)
    if phase is None:
        return "absent"
    active = await conn.fetchval(
        f"SELECT 1 FROM runs WHERE job_id = $1 AND phase IN ({ACTIVE_LITERALS}) LIMIT 1", job_id
    )
    if not lifecycle.may_delete(Phase(phase), active is not None):
        return "active"
    for table in _JOB_TABLES:
        await conn.execute(f"DELETE FROM {table} WHERE job_id = $1", job_id)
    await conn.execute("DELETE FROM jobs WHERE id = $1", job_id)
    return "deleted"
