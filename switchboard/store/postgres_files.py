"""Runs' output files in the PostgreSQL store (sqlite_files.py's SQL, translated): what
each run kept (run_files) and what it did not (run_files_refused). Every function runs
inside the caller's transaction.
"""

from __future__ import annotations

from protocol.messages import JobFiles
from switchboard.models import (
    FilesSummary,
    PendingReport,
    ReportStatus,
    RunFile,
    RunFileRefused,
    RunFiles,
)
from switchboard.store.postgres_engine import Connection
from switchboard.store.sqlite_files import FilesStored, globs_of_spec, refusal

#: A file's columns, as RunFile holds them.
_FILE = "path, size, digest, media_type, report, report_error"


async def report_globs(conn: Connection, job_id: str) -> list[str]:
    """The job's `reports.junit` globs (none: it names no reports)."""
    spec = await conn.fetchval("SELECT spec FROM jobs WHERE id = $1", job_id)
    return [] if spec is None else globs_of_spec(spec)


async def store_files(conn: Connection, event: JobFiles, junit: list[str]) -> FilesStored:
    """sqlite_files.store_files: link the run to each file the event lists, record the
    refused ones."""
    key = (event.job_id, event.attempt)
    result = FilesStored(refused=len(event.refused) + event.refused_unlisted)
    for file in event.files:
        size = await conn.fetchval("SELECT size FROM artifacts WHERE digest = $1", file.digest)
        reason, report = refusal(result, key, file, size, junit)
        if reason is not None:
            await _refuse(conn, key, file.path, reason)
            continue
        await conn.execute(
            "INSERT INTO run_files"
            " (job_id, attempt, path, digest, size, media_type, report, report_error)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)"
            " ON CONFLICT (job_id, attempt, path) DO UPDATE SET digest = excluded.digest,"
            " size = excluded.size, media_type = excluded.media_type,"
            " report = excluded.report, report_error = NULL",
            *key,
            file.path,
            file.digest,
            file.size,
            file.media_type,
            report,
        )
        await conn.execute(
            "DELETE FROM run_files_refused WHERE job_id = $1 AND attempt = $2 AND path = $3",
            *key,
            file.path,
        )
        result.kept += 1
    for refused in event.refused:
        await _refuse(conn, key, refused.path, refused.reason)
    if event.refused_unlisted:
        await conn.execute(
            "UPDATE runs SET files_refused_unlisted = files_refused_unlisted + $1"
            " WHERE job_id = $2 AND attempt = $3",
            event.refused_unlisted,
            *key,
        )
    return result


async def _refuse(conn: Connection, key: tuple[str, int], path: str, reason: str) -> None:
    await conn.execute(
        "INSERT INTO run_files_refused (job_id, attempt, path, reason) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (job_id, attempt, path) DO UPDATE SET reason = excluded.reason",
        *key,
        path,
        reason,
    )


async def set_report(
    conn: Connection, job_id: str, attempt: int, path: str, status: ReportStatus, error: str | None
) -> None:
    await conn.execute(
        "UPDATE run_files SET report = $1, report_error = $2"
        " WHERE job_id = $3 AND attempt = $4 AND path = $5",
        status,
        error,
        job_id,
        attempt,
        path,
    )


async def pending_reports(conn: Connection, limit: int) -> list[PendingReport]:
    rows = await conn.fetch(
        "SELECT job_id, attempt, path, digest FROM run_files WHERE report = 'pending' LIMIT $1",
        limit,
    )
    return [PendingReport(*row) for row in rows]


async def _latest_attempt(conn: Connection, job_id: str) -> int | None:
    """The job's latest run that kept or refused files."""
    attempt: int | None = await conn.fetchval(
        "SELECT max(attempt) FROM (SELECT attempt FROM run_files WHERE job_id = $1"
        " UNION ALL SELECT attempt FROM run_files_refused WHERE job_id = $1"
        " UNION ALL SELECT attempt FROM runs WHERE job_id = $1 AND files_refused_unlisted > 0)"
        " AS any_files",
        job_id,
    )
    return attempt


async def run_files(conn: Connection, job_id: str, attempt: int | None) -> RunFiles | None:
    if await conn.fetchval("SELECT 1 FROM jobs WHERE id = $1", job_id) is None:
        return None
    if attempt is None:
        attempt = await _latest_attempt(conn, job_id)
        if attempt is None:
            return RunFiles(attempt=None)
    unlisted = await conn.fetchval(
        "SELECT files_refused_unlisted FROM runs WHERE job_id = $1 AND attempt = $2",
        job_id,
        attempt,
    )
    if unlisted is None:
        return None
    files = await conn.fetch(
        f"SELECT {_FILE} FROM run_files WHERE job_id = $1 AND attempt = $2"
        ' ORDER BY path COLLATE "C"',
        job_id,
        attempt,
    )
    refused = await conn.fetch(
        "SELECT path, reason FROM run_files_refused WHERE job_id = $1 AND attempt = $2"
        ' ORDER BY path COLLATE "C"',
        job_id,
        attempt,
    )
    return RunFiles(
        attempt,
        [RunFile(*row) for row in files],
        [RunFileRefused(*row) for row in refused],
        unlisted,
    )


async def run_file(
    conn: Connection, job_id: str, attempt: int | None, path: str
) -> tuple[int, RunFile] | None:
    if attempt is None:
        attempt = await _latest_attempt(conn, job_id)
        if attempt is None:
            return None
    row = await conn.fetchrow(
        f"SELECT {_FILE} FROM run_files WHERE job_id = $1 AND attempt = $2 AND path = $3",
        job_id,
        attempt,
        path,
    )
    return (attempt, RunFile(*row)) if row else None


async def files_summary(conn: Connection, job_id: str) -> FilesSummary | None:
    attempt = await _latest_attempt(conn, job_id)
    if attempt is None:
        return None
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM run_files WHERE job_id = $1 AND attempt = $2),"
        " (SELECT coalesce(sum(size), 0)::bigint FROM run_files"
        "  WHERE job_id = $1 AND attempt = $2),"
        " (SELECT count(*) FROM run_files_refused WHERE job_id = $1 AND attempt = $2)"
        " + (SELECT files_refused_unlisted FROM runs WHERE job_id = $1 AND attempt = $2)",
        job_id,
        attempt,
    )
    assert row is not None  # aggregates always give a row
    return FilesSummary(attempt, row[0], row[1], row[2] or 0)
