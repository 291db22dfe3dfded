"""Job transactions of the SQLite store that run on the writer's or a reader's connection:
submission with concurrency policies, cancel, listing, the audit trail, deletion.

Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from protocol.spec import JobSpec
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
from switchboard.sealing import Keyring, split_secrets
from switchboard.store import records
from switchboard.store.errors import ArtifactMissing, QueueFull, QueueQuotaFull
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL, TERMINAL_PHASES, TERMINAL_SQL
from switchboard.store.sqlite_secrets import store_sealed

_encoder = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(JobSpec)


def record_event(
    conn: sqlite3.Connection,
    job_id: str,
    kind: str,
    message: str,
    *,
    attempt: int | None = None,
    actor: str | None = None,
    at: float | None = None,
) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, at, kind, message, attempt, actor)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, at or time.time(), kind, message, attempt, actor or None),
    )


def record_events(conn: sqlite3.Connection, job_id: str, events: Sequence[AuditEntry]) -> None:
    """Write the audit entries a lifecycle decision came with."""
    for e in events:
        conn.execute(
            "INSERT INTO job_events (job_id, at, kind, message, attempt, actor)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, e.at, e.kind, e.message, e.attempt, e.actor or None),
        )


class NewJob(NamedTuple):
    """A job about to be stored: its spec as stored (secret values replaced) and those
    values, sealed (None: it has none)."""

    id: str
    spec: JobSpec
    sealed: bytes | None


def new_jobs(keyring: Keyring, batch: Sequence[tuple[str, JobSpec]]) -> list[NewJob]:
    """The jobs as they are written: secret values out of the specs, sealed."""
    made = []
    for job_id, spec in batch:
        stored, values = split_secrets(spec)
        sealed = keyring.seal(job_id, values) if values else None
        made.append(NewJob(job_id, stored, sealed))
    return made


def _record_artifacts(conn: sqlite3.Connection, index: int, job_id: str, spec: JobSpec) -> None:
    """Note the artifacts a job being inserted names (a use of each); ArtifactMissing if
    one is not stored. `index`: the job's place in its batch."""
    now = time.time()
    for field, digest in named_artifacts(spec):
        if not conn.execute(
            "UPDATE artifacts SET last_used = ? WHERE digest = ?", (now, digest)
        ).rowcount:
            raise ArtifactMissing(index, field, digest)
        conn.execute(
            "INSERT OR IGNORE INTO job_artifacts (digest, job_id) VALUES (?, ?)", (digest, job_id)
        )


#: How many jobs a token has queued (its queue quota), from the covering index alone.
QUEUED_BY_OWNER = "SELECT count(*) FROM jobs WHERE owner = ? AND phase = 'queued'"


def insert_jobs(
    conn: sqlite3.Connection,
    jobs: list[NewJob],
    actor: str,
    max_queued: int,
    *,
    owner: str | None = None,
    max_per_owner: int | None = None,
) -> list[Submitted]:
    """Insert jobs owned by token `owner` (all or none: the caller's savepoint rolls back
    on QueueFull or ArtifactMissing)."""
    (queued,) = conn.execute("SELECT count(*) FROM jobs WHERE phase = 'queued'").fetchone()
    if queued + len(jobs) > max_queued:
        raise QueueFull(f"{queued} jobs are queued; the switchboard takes at most {max_queued}")
    if owner is not None and max_per_owner is not None:
        (mine,) = conn.execute(QUEUED_BY_OWNER, (owner,)).fetchone()
        if mine + len(jobs) > max_per_owner:
            raise QueueQuotaFull(
                f"this token has {mine} jobs queued; one token may have at most"
                f" {max_per_owner} (the switchboard's --max-queued-per-token)"
            )
    made = []
    for index, job in enumerate(jobs):
        # In the same transaction: an artifact can't be deleted between check and insert.
        _record_artifacts(conn, index, job.id, job.spec)
        made.append(_insert_job(conn, job, actor, owner))
    return made


def _insert_job(conn: sqlite3.Connection, job: NewJob, actor: str, owner: str | None) -> Submitted:
    job_id, spec = job.id, job.spec
    now = time.time()
    key = spec.concurrency.key if spec.concurrency else None
    holders = (
        [
            row[0]
            for row in conn.execute(
                f"SELECT id FROM jobs WHERE concurrency_key = ? AND phase NOT IN ({TERMINAL_SQL})"
                " ORDER BY seq",
                (key, *TERMINAL_PHASES),
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
        result = cancel_job(conn, holder, actor, lifecycle.replaced_by(job_id))
        if result and result.supervisor_id is not None and result.attempt is not None:
            stops.append(RunOnSupervisor(holder, result.attempt, result.supervisor_id))
    conn.execute(
        "INSERT INTO jobs (id, name, spec, phase, priority, labels, resources, concurrency_key,"
        " timeout_s, queued_at, queue_deadline, reason, created_at, updated_at, owner,"
        " reservation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
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
        ),
    )
    if job.sealed is not None and start.keep_secrets:
        store_sealed(conn, job_id, job.sealed)
    record_events(conn, job_id, start.events)
    return Submitted(job_id, start.phase.value, start.reason, stops)


def cancel_job(
    conn: sqlite3.Connection, job_id: str, actor: str, why: str = "canceled"
) -> CancelResult | None:
    """Cancel as switchboard.lifecycle.on_cancel decides; names the run to stop, if any."""
    row = conn.execute("SELECT phase, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    phase, attempts = Phase(row[0]), row[1]
    now = time.time()
    cancel = lifecycle.on_cancel(phase, why, actor, now)
    if cancel is None:
        return CancelResult(phase.value)
    record_events(conn, job_id, [cancel.event])
    conn.execute(
        "UPDATE jobs SET phase = ?, cancel_requested = 1, reason = ?, updated_at = ?,"
        " queue_deadline = NULL, waiting_for = NULL WHERE id = ?",
        (cancel.phase.value, cancel.reason, now, job_id),
    )
    if not cancel.stop_run:
        return CancelResult(cancel.phase.value)
    run = conn.execute(
        "SELECT supervisor_id FROM runs WHERE job_id = ? AND attempt = ?", (job_id, attempts)
    ).fetchone()
    return CancelResult(phase.value, run[0] if run else None, attempts)


def end_queued_job(conn: sqlite3.Connection, job_id: str, end: lifecycle.JobEnd) -> None:
    """End a queued job before any run, as the lifecycle decided."""
    conn.execute(
        "UPDATE jobs SET phase = ?, reason = ?, queue_deadline = NULL, unschedulable = NULL,"
        " not_before = NULL, waiting_for = NULL, updated_at = ? WHERE id = ?",
        (end.phase.value, end.reason, end.event.at, job_id),
    )
    record_events(conn, job_id, [end.event])


def list_jobs(conn: sqlite3.Connection, where: JobFilter) -> list[tuple[int, JobSummary]]:
    clauses: list[str] = []
    args: list[object] = []
    if where.phases:
        clauses.append(f"j.phase IN ({','.join('?' * len(where.phases))})")
        args.extend(where.phases)
    for term in where.labels:
        path = '$."' + term.key + '"'  # label keys never hold a double quote
        if term.op == "=":
            clauses.append("json_extract(j.labels, ?) = ?")
            args.extend((path, term.value))
        elif term.op == "!=":
            clauses.append("coalesce(json_extract(j.labels, ?) != ?, 1)")
            args.extend((path, term.value))
        elif term.op == "exists":
            clauses.append("json_type(j.labels, ?) IS NOT NULL")
            args.append(path)
        else:
            clauses.append("json_type(j.labels, ?) IS NULL")
            args.append(path)
    if where.supervisor_id is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM runs r WHERE r.job_id = j.id AND r.supervisor_id = ?)"
        )
        args.append(where.supervisor_id)
    if where.created_after is not None:
        clauses.append("j.created_at >= ?")
        args.append(where.created_after)
    if where.created_before is not None:
        clauses.append("j.created_at < ?")
        args.append(where.created_before)
    if where.before_seq is not None:
        clauses.append("j.seq < ?")
        args.append(where.before_seq)
    if where.ids:
        clauses.append(f"j.id IN ({','.join('?' * len(where.ids))})")
        args.extend(where.ids)
    if where.owner is not None:
        clauses.append("j.owner = ?")
        args.append(where.owner)
    if where.text:
        pattern = where.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append("(j.name LIKE ? ESCAPE '\\' OR j.id LIKE ? ESCAPE '\\')")
        args.extend((f"%{pattern}%", f"{pattern}%"))
    sql = f"SELECT {records.SUMMARY_COLUMNS} FROM jobs j"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY j.seq DESC LIMIT ?"
    args.append(where.limit)
    return [records.job_summary(r) for r in conn.execute(sql, args)]


def job_events(conn: sqlite3.Connection, job_id: str) -> list[JobEvent] | None:
    """The job's own events and its runs' phase changes, in time order."""
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
        return None
    return records.job_events(
        conn.execute(
            f"SELECT {records.EVENT_COLUMNS} FROM job_events WHERE job_id = ? ORDER BY id",
            (job_id,),
        ),
        conn.execute(
            f"SELECT {records.PHASE_COLUMNS} FROM run_phases WHERE job_id = ? ORDER BY id",
            (job_id,),
        ),
    )


def expire_queued(conn: sqlite3.Connection, now: float) -> list[str]:
    """End every queued job past its queue deadline, as the lifecycle says."""
    jobs = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM jobs WHERE queue_deadline <= ? AND phase = 'queued'", (now,)
        ).fetchall()
    ]
    for job_id in jobs:
        end_queued_job(conn, job_id, lifecycle.queue_timed_out(now))
    return jobs


def phases_of(conn: sqlite3.Connection, job_ids: list[str]) -> dict[str, str]:
    """The phase of each of the jobs that exists (at most 500: SQLite's variables)."""
    marks = ",".join("?" * len(job_ids))
    return dict(conn.execute(f"SELECT id, phase FROM jobs WHERE id IN ({marks})", job_ids))


def load_job(conn: sqlite3.Connection, job_id: str) -> JobView | None:
    row = conn.execute(
        f"SELECT {records.JOB_COLUMNS} FROM jobs j LEFT JOIN tokens t ON t.id = j.owner"
        " WHERE j.id = ?",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    return records.job_view(
        row,
        conn.execute(
            f"SELECT {records.RUN_COLUMNS} FROM runs WHERE job_id = ? ORDER BY attempt",
            (job_id,),
        ),
        conn.execute(
            f"SELECT {records.PHASE_COLUMNS} FROM run_phases WHERE job_id = ? ORDER BY id",
            (job_id,),
        ),
        conn.execute(
            "SELECT attempt, device_id, role FROM run_devices WHERE job_id = ?"
            " ORDER BY attempt, pos, device_id",
            (job_id,),
        ),
    )


def delete_job(conn: sqlite3.Connection, job_id: str) -> str:
    row = conn.execute("SELECT phase FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return "absent"
    active = conn.execute(
        f"SELECT 1 FROM runs WHERE job_id = ? AND phase IN ({ACTIVE_SQL})",
        (job_id, *ACTIVE_PHASES),
    ).fetchone()
    if not lifecycle.may_delete(Phase(row[0]), active is not None):
        return "active"
    for table in (
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
    ):
        conn.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
    conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    return "deleted"
