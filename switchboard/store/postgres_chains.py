"""Chained jobs in the PostgreSQL store (sqlite_chains.py's, translated): reading the jobs a
chained job names, and applying what switchboard.chains decides, at submission and in
the dispatcher's sweep. Every function runs inside the caller's transaction.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import msgspec

from protocol.spec import JobSpec
from protocol.state import Phase
from switchboard import chains, lifecycle
from switchboard.models import ChainPass, Submitted
from switchboard.store.errors import InputUnavailable
from switchboard.store.postgres_engine import Connection
from switchboard.store.postgres_jobs import end_queued_job, note_artifact_use, record_event
from switchboard.store.records import decode_spec
from switchboard.store.schema import TERMINAL_LITERALS
from switchboard.store.sqlite_jobs import NewJob

_encoder = msgspec.json.Encoder()


async def _sources(conn: Connection, spec: JobSpec) -> dict[str, chains.Source | None]:
    sources: dict[str, chains.Source | None] = {}
    for job_id, paths in chains.wanted_files(spec).items():
        row = await conn.fetchrow("SELECT phase, attempts FROM jobs WHERE id = $1", job_id)
        if row is None:
            sources[job_id] = None
            continue
        files = await conn.fetch(
            "SELECT path, digest FROM run_files WHERE job_id = $1 AND attempt = $2"
            " AND path = ANY($3::text[])",
            job_id,
            row[1],
            sorted(paths),
        )
        sources[job_id] = chains.Source(Phase(row[0]), {r[0]: r[1] for r in files})
    return sources


async def insert_with_chains(
    conn: Connection,
    batch: list[NewJob],
    insert: Callable[[list[NewJob]], Awaitable[list[Submitted]]],
) -> list[Submitted]:
    """Insert a batch (with `insert`), its chained jobs' inputs resolved as far as the
    jobs they name allow: resolved ones go in with digests, the others wait.
    InputUnavailable if one could never run (the caller's transaction stores nothing)."""
    plans: list[tuple[NewJob, chains.Resolution | None]] = []
    for index, job in enumerate(batch):
        if not job.spec.chained_inputs():
            plans.append((job, None))
            continue
        resolution = chains.resolve(job.spec, await _sources(conn, job.spec))
        if resolution.problem is not None:
            raise InputUnavailable(index, resolution.problem)
        plans.append((job, resolution))
    made = await insert([job._replace(spec=r.spec) if r and r.spec else job for job, r in plans])
    for job, planned in plans:
        if planned is None:
            continue
        if planned.spec is not None:
            await _note_resolved(conn, job.id, job.spec, planned.spec)
        elif planned.waiting_for is not None:
            await _mark_waiting(conn, job.id, planned.waiting_for)
    return made


async def _mark_waiting(conn: Connection, job_id: str, source: str) -> None:
    await conn.execute(
        "UPDATE jobs SET waiting_for = $1, unschedulable = $2 WHERE id = $3 AND phase = 'queued'",
        source,
        chains.waiting_reason(source),
        job_id,
    )


async def _note_resolved(conn: Connection, job_id: str, before: JobSpec, after: JobSpec) -> None:
    await record_event(conn, job_id, "inputs_resolved", chains.resolved_message(before, after))


async def _still_stored(conn: Connection, job_id: str, spec: JobSpec) -> str | None:
    """Note the resolved inputs as artifacts the job holds; the problem if one is gone."""
    now = time.time()
    for path, digest in spec.input_digests().items():
        if not await note_artifact_use(conn, job_id, digest, now):
            return f"inputs[{path!r}]: the file ({digest}) is no longer stored"
    return None


#: Waiting jobs whose awaited job has ended or is gone (the partial index jobs_waiting);
#: one another replica's sweep holds is left to it.
_DUE = (
    "SELECT w.id, w.spec FROM jobs w LEFT JOIN jobs s ON s.id = w.waiting_for"
    " WHERE w.waiting_for IS NOT NULL AND w.phase = 'queued'"
    f" AND (s.id IS NULL OR s.phase IN ({TERMINAL_LITERALS})) LIMIT $1"
    " FOR UPDATE OF w SKIP LOCKED"
)


async def waiting(conn: Connection) -> tuple[bool, int]:
    """sqlite_chains.waiting: whether a sweep has work, and how many jobs wait (a read, so
    passes while a long job runs write nothing)."""
    due = await conn.fetchval(_DUE.removesuffix(" FOR UPDATE OF w SKIP LOCKED"), 1)
    count = await conn.fetchval(
        "SELECT count(*) FROM jobs WHERE waiting_for IS NOT NULL AND phase = 'queued'"
    )
    return due is not None, int(count)


async def sweep(conn: Connection, limit: int) -> ChainPass:
    """Resolve (or reject) the waiting jobs whose awaited job has ended."""
    resolved = rejected = 0
    for job_id, blob in await conn.fetch(_DUE, limit):
        spec = decode_spec(blob)
        resolution = chains.resolve(spec, await _sources(conn, spec))
        problem = resolution.problem
        if resolution.waiting_for is not None:
            await _mark_waiting(conn, job_id, resolution.waiting_for)
            continue
        if resolution.spec is not None:
            problem = await _still_stored(conn, job_id, resolution.spec)
        if problem is not None:
            await end_queued_job(conn, job_id, lifecycle.inputs_unavailable(problem, time.time()))
            rejected += 1
            continue
        assert resolution.spec is not None
        await conn.execute(
            "UPDATE jobs SET spec = $1, waiting_for = NULL, unschedulable = NULL, updated_at = $2"
            " WHERE id = $3",
            _encoder.encode(resolution.spec),
            time.time(),
            job_id,
        )
        await _note_resolved(conn, job_id, spec, resolution.spec)
        resolved += 1
    return ChainPass(resolved, rejected, (await waiting(conn))[1])
