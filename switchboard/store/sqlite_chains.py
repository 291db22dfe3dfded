"""Chained jobs in the SQLite store: reading the jobs a chained job names, and applying
what switchboard.chains decides, at submission and in the dispatcher's sweep.

A waiting job is queued with `waiting_for` (the job whose end it awaits) and an
`unschedulable` note saying so; placement leaves it out until the sweep resolves it.
Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

import msgspec

from protocol.spec import JobSpec
from protocol.state import Phase
from switchboard import chains, lifecycle
from switchboard.models import ChainPass, Submitted
from switchboard.store.errors import InputUnavailable
from switchboard.store.schema import TERMINAL_PHASES, TERMINAL_SQL
from switchboard.store.sqlite_jobs import NewJob, end_queued_job, record_event

_encoder = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(JobSpec)


def _sources(conn: sqlite3.Connection, spec: JobSpec) -> dict[str, chains.Source | None]:
    sources: dict[str, chains.Source | None] = {}
    for job_id, paths in chains.wanted_files(spec).items():
        row = conn.execute("SELECT phase, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            sources[job_id] = None
            continue
        files = {
            path: digest
            for path, digest in conn.execute(
                "SELECT path, digest FROM run_files WHERE job_id = ? AND attempt = ?"
                f" AND path IN ({', '.join('?' * len(paths))})",
                (job_id, row[1], *sorted(paths)),
            )
        }
        sources[job_id] = chains.Source(Phase(row[0]), files)
    return sources


def _still_stored(conn: sqlite3.Connection, job_id: str, spec: JobSpec) -> str | None:
    """Note the resolved inputs as artifacts the job holds; the problem if one is gone."""
    now = time.time()
    for path, digest in spec.input_digests().items():
        if not conn.execute(
            "UPDATE artifacts SET last_used = ? WHERE digest = ?", (now, digest)
        ).rowcount:
            return f"inputs[{path!r}]: the file ({digest}) is no longer stored"
        conn.execute(
            "INSERT OR IGNORE INTO job_artifacts (digest, job_id) VALUES (?, ?)", (digest, job_id)
        )
    return None


def insert_with_chains(
    conn: sqlite3.Connection,
    batch: list[NewJob],
    insert: Callable[[list[NewJob]], list[Submitted]],
) -> list[Submitted]:
    """Insert a batch (with `insert`), its chained jobs' inputs resolved as far as the
    jobs they name allow: resolved ones go in with digests, the others wait.
    InputUnavailable if one could never run (the caller's transaction stores nothing)."""
    plans: list[tuple[NewJob, chains.Resolution | None]] = []
    for index, job in enumerate(batch):
        if not job.spec.chained_inputs():
            plans.append((job, None))
            continue
        resolution = chains.resolve(job.spec, _sources(conn, job.spec))
        if resolution.problem is not None:
            raise InputUnavailable(index, resolution.problem)
        plans.append((job, resolution))
    made = insert([job._replace(spec=r.spec) if r and r.spec else job for job, r in plans])
    for job, planned in plans:
        if planned is None:
            continue
        if planned.spec is not None:
            _note_resolved(conn, job.id, job.spec, planned.spec)
        elif planned.waiting_for is not None:
            _mark_waiting(conn, job.id, planned.waiting_for)
    return made


def _mark_waiting(conn: sqlite3.Connection, job_id: str, source: str) -> None:
    conn.execute(
        "UPDATE jobs SET waiting_for = ?, unschedulable = ? WHERE id = ? AND phase = 'queued'",
        (source, chains.waiting_reason(source), job_id),
    )


def _note_resolved(conn: sqlite3.Connection, job_id: str, before: JobSpec, after: JobSpec) -> None:
    record_event(conn, job_id, "inputs_resolved", chains.resolved_message(before, after))


#: Waiting jobs whose awaited job has ended or is gone (the partial index jobs_waiting).
_DUE = (
    "SELECT w.id, w.spec FROM jobs w LEFT JOIN jobs s ON s.id = w.waiting_for"
    " WHERE w.waiting_for IS NOT NULL AND w.phase = 'queued'"
    f" AND (s.id IS NULL OR s.phase IN ({TERMINAL_SQL})) LIMIT ?"
)


def waiting(conn: sqlite3.Connection) -> tuple[bool, int]:
    """Whether a sweep has work (a waiting job whose awaited job has ended or is gone),
    and how many jobs wait: a read, so that passes while a long job runs write nothing."""
    due = conn.execute(_DUE, (*TERMINAL_PHASES, 1)).fetchone() is not None
    (count,) = conn.execute(
        "SELECT count(*) FROM jobs WHERE waiting_for IS NOT NULL AND phase = 'queued'"
    ).fetchone()
    return due, count


def sweep(conn: sqlite3.Connection, limit: int) -> ChainPass:
    """Resolve (or reject) the waiting jobs whose awaited job has ended."""
    resolved = rejected = 0
    for job_id, blob in conn.execute(_DUE, (*TERMINAL_PHASES, limit)).fetchall():
        spec = _spec_decoder.decode(blob)
        resolution = chains.resolve(spec, _sources(conn, spec))
        problem = resolution.problem
        if resolution.waiting_for is not None:
            _mark_waiting(conn, job_id, resolution.waiting_for)
            continue
        if resolution.spec is not None:
            problem = _still_stored(conn, job_id, resolution.spec)
        if problem is not None:
            end_queued_job(conn, job_id, lifecycle.inputs_unavailable(problem, time.time()))
            rejected += 1
            continue
        assert resolution.spec is not None
        conn.execute(
            "UPDATE jobs SET spec = ?, waiting_for = NULL, unschedulable = NULL, updated_at = ?"
            " WHERE id = ?",
            (_encoder.encode(resolution.spec), time.time(), job_id),
        )
        _note_resolved(conn, job_id, spec, resolution.spec)
        resolved += 1
    return ChainPass(resolved, rejected, waiting(conn)[1])
