"""Runs' output files in the SQLite store: what each run kept (run_files, each an
artifact the supervisor uploaded before listing it) and what it did not (run_files_refused).
Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3

import msgspec

from protocol import globs
from protocol.messages import JobFiles, OutputFile
from switchboard.models import (
    FilesSummary,
    PendingReport,
    ReportStatus,
    RunFile,
    RunFileRefused,
    RunFiles,
)


class _Reports(msgspec.Struct):
    junit: list[str] | str = []


class _ReportFacts(msgspec.Struct):
    """What storing files reads of a stored spec: its report globs (the rest skipped)."""

    reports: _Reports | None = None


_facts_decoder = msgspec.json.Decoder(_ReportFacts)


def report_globs(conn: sqlite3.Connection, job_id: str) -> list[str]:
    """The job's `reports.junit` globs (none: it names no reports)."""
    row = conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return [] if row is None else globs_of_spec(row[0])


def globs_of_spec(spec: bytes) -> list[str]:
    """A stored spec's `reports.junit` globs, read without decoding the rest."""
    try:
        reports = _facts_decoder.decode(spec).reports
    except msgspec.DecodeError:
        return []
    if reports is None:
        return []
    return [reports.junit] if isinstance(reports.junit, str) else reports.junit


class FilesStored(msgspec.Struct):
    """What storing one `files` event did: files kept, refused by the supervisor, refused
    here (listed under a digest not stored, or with the wrong size; or under a path that is
    not relative), and the reports to parse."""

    kept: int = 0
    refused: int = 0
    not_uploaded: list[str] = []
    invalid: list[str] = []
    reports: list[PendingReport] = []


def refusal(
    result: FilesStored,
    key: tuple[str, int],
    file: OutputFile,
    size: int | None,
    junit: list[str],
) -> tuple[str | None, ReportStatus | None]:
    """Whether a listed file is kept: why not (noted in `result`), or (None, its report
    status: "pending" if it is one of the spec's `junit` reports, noted in `result`).
    `size`: the stored artifact's of its digest (None: never uploaded)."""
    if not globs.is_relative_path(file.path):
        # The wire gives it only a length: one that could lead out of a directory it is
        # downloaded into is never kept.
        result.invalid.append(file.path)
        return "not a relative path (empty, `.` or `..` parts)", None
    reason = None
    if size is None:
        reason = f"listed as {file.digest}, which was never uploaded: not kept"
    elif size != file.size:
        reason = f"listed as {file.size} bytes, its artifact {file.digest} has {size}"
    if reason is not None:
        result.not_uploaded.append(file.path)
        return reason, None
    if junit and globs.matches_any(file.path, junit):
        result.reports.append(PendingReport(*key, file.path, file.digest))
        return None, "pending"
    return None, None


def store_files(conn: sqlite3.Connection, event: JobFiles, junit: list[str]) -> FilesStored:
    """Link the run to each file the event lists (a file listed again replaces its older
    row), and record the refused ones; a file whose digest is not a stored artifact of
    its size is recorded as refused, not linked. `junit`: the spec's report globs."""
    key = (event.job_id, event.attempt)
    result = FilesStored(refused=len(event.refused) + event.refused_unlisted)
    for file in event.files:
        row = conn.execute("SELECT size FROM artifacts WHERE digest = ?", (file.digest,)).fetchone()
        reason, report = refusal(result, key, file, row[0] if row else None, junit)
        if reason is not None:
            _refuse(conn, key, file.path, reason)
            continue
        conn.execute(
            "INSERT OR REPLACE INTO run_files"
            " (job_id, attempt, path, digest, size, media_type, report, report_error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
            (*key, file.path, file.digest, file.size, file.media_type, report),
        )
        conn.execute(
            "DELETE FROM run_files_refused WHERE job_id = ? AND attempt = ? AND path = ?",
            (*key, file.path),
        )
        result.kept += 1
    for refused in event.refused:
        _refuse(conn, key, refused.path, refused.reason)
    if event.refused_unlisted:
        conn.execute(
            "UPDATE runs SET files_refused_unlisted = files_refused_unlisted + ?"
            " WHERE job_id = ? AND attempt = ?",
            (event.refused_unlisted, *key),
        )
    return result


def _refuse(conn: sqlite3.Connection, key: tuple[str, int], path: str, reason: str) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO run_files_refused (job_id, attempt, path, reason)"
        " VALUES (?, ?, ?, ?)",
        (*key, path, reason),
    )


def set_report(
    conn: sqlite3.Connection,
    job_id: str,
    attempt: int,
    path: str,
    status: ReportStatus,
    error: str | None,
) -> None:
    conn.execute(
        "UPDATE run_files SET report = ?, report_error = ?"
        " WHERE job_id = ? AND attempt = ? AND path = ?",
        (status, error, job_id, attempt, path),
    )


def pending_reports(conn: sqlite3.Connection, limit: int) -> list[PendingReport]:
    """Reports stored and not parsed yet (the switchboard stopped meanwhile)."""
    rows = conn.execute(
        "SELECT job_id, attempt, path, digest FROM run_files WHERE report = 'pending' LIMIT ?",
        (limit,),
    ).fetchall()
    return [PendingReport(*row) for row in rows]


def _latest_attempt(conn: sqlite3.Connection, job_id: str) -> int | None:
    """The job's latest run that kept or refused files."""
    (attempt,) = conn.execute(
        "SELECT max(attempt) FROM (SELECT attempt FROM run_files WHERE job_id = ?"
        " UNION ALL SELECT attempt FROM run_files_refused WHERE job_id = ?"
        " UNION ALL SELECT attempt FROM runs WHERE job_id = ? AND files_refused_unlisted > 0)",
        (job_id, job_id, job_id),
    ).fetchone()
    return attempt


def run_files(conn: sqlite3.Connection, job_id: str, attempt: int | None) -> RunFiles | None:
    """The files of run `attempt` (None: the latest run that has any); None if there is
    no such job (or no such run of it)."""
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
        return None
    if attempt is None:
        attempt = _latest_attempt(conn, job_id)
        if attempt is None:
            return RunFiles(attempt=None)
    unlisted = conn.execute(
        "SELECT files_refused_unlisted FROM runs WHERE job_id = ? AND attempt = ?",
        (job_id, attempt),
    ).fetchone()
    if unlisted is None:
        return None
    files = [
        RunFile(*row)
        for row in conn.execute(
            "SELECT path, size, digest, media_type, report, report_error FROM run_files"
            " WHERE job_id = ? AND attempt = ? ORDER BY path",
            (job_id, attempt),
        )
    ]
    refused = [
        RunFileRefused(*row)
        for row in conn.execute(
            "SELECT path, reason FROM run_files_refused WHERE job_id = ? AND attempt = ?"
            " ORDER BY path",
            (job_id, attempt),
        )
    ]
    return RunFiles(attempt, files, refused, unlisted[0])


def run_file(
    conn: sqlite3.Connection, job_id: str, attempt: int | None, path: str
) -> tuple[int, RunFile] | None:
    """One kept file of run `attempt` (None: the latest run that has files), with the
    attempt; None if there is none."""
    if attempt is None:
        attempt = _latest_attempt(conn, job_id)
        if attempt is None:
            return None
    row = conn.execute(
        "SELECT path, size, digest, media_type, report, report_error FROM run_files"
        " WHERE job_id = ? AND attempt = ? AND path = ?",
        (job_id, attempt, path),
    ).fetchone()
    return (attempt, RunFile(*row)) if row else None


def files_summary(conn: sqlite3.Connection, job_id: str) -> FilesSummary | None:
    """The job's latest run with files, counted (None: no run has any)."""
    attempt = _latest_attempt(conn, job_id)
    return None if attempt is None else counted(conn, job_id, attempt)


def counted(conn: sqlite3.Connection, job_id: str, attempt: int) -> FilesSummary:
    """Run `attempt`'s files: kept (how many, bytes) and refused."""
    count, size = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM run_files WHERE job_id = ? AND attempt = ?",
        (job_id, attempt),
    ).fetchone()
    (refused,) = conn.execute(
        "SELECT count(*) + (SELECT files_refused_unlisted FROM runs"
        " WHERE job_id = ?1 AND attempt = ?2) FROM run_files_refused"
        " WHERE job_id = ?1 AND attempt = ?2",
        (job_id, attempt),
    ).fetchone()
    return FilesSummary(attempt, count, size, refused or 0)
