"""Jobs as GET /api/v1/jobs/{id} shows them (runs, phase history, devices, test and file
counts), many in one read: one statement per table for all of them, not one set of
statements per job. A wait that answers with jobs that ended together reads them so."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from switchboard.models import FilesSummary, JobView, TestCounts
from switchboard.store import records, sqlite_files
from switchboard.store.schema import TERMINAL_PHASES

#: Jobs read per set of statements (each names them once, by numbered variables).
CHUNK = 500


def job_details(
    conn: sqlite3.Connection, job_ids: Sequence[str], *, ended_only: bool = False
) -> dict[str, JobView]:
    """The jobs that exist among `job_ids` (only those in a terminal phase if
    `ended_only`), by id."""
    found: dict[str, JobView] = {}
    for start in range(0, len(job_ids), CHUNK):
        found.update(_chunk(conn, list(job_ids[start : start + CHUNK]), ended_only))
    return found


def _chunk(conn: sqlite3.Connection, ids: list[str], ended_only: bool) -> dict[str, JobView]:
    marks = ",".join(f"?{i + 1}" for i in range(len(ids)))
    where = f"j.id IN ({marks})"
    args: list[Any] = list(ids)
    if ended_only:
        terminal = ",".join(f"?{len(ids) + i + 1}" for i in range(len(TERMINAL_PHASES)))
        where += f" AND j.phase IN ({terminal})"
        args += TERMINAL_PHASES
    rows = conn.execute(
        f"SELECT {records.JOB_COLUMNS} FROM jobs j LEFT JOIN tokens t ON t.id = j.owner"
        f" WHERE {where}",
        args,
    ).fetchall()
    if not rows:
        return {}
    ids = [row[0] for row in rows]
    marks = ",".join(f"?{i + 1}" for i in range(len(ids)))
    runs = _by_job(
        conn.execute(
            f"SELECT job_id, {records.RUN_COLUMNS} FROM runs WHERE job_id IN ({marks})"
            " ORDER BY job_id, attempt",
            ids,
        )
    )
    phases = _by_job(
        conn.execute(
            f"SELECT job_id, {records.PHASE_COLUMNS} FROM run_phases WHERE job_id IN ({marks})"
            " ORDER BY id",
            ids,
        )
    )
    devices = _by_job(
        conn.execute(
            "SELECT job_id, attempt, device_id, role FROM run_devices"
            f" WHERE job_id IN ({marks}) ORDER BY job_id, attempt, pos, device_id",
            ids,
        )
    )
    tests = _test_counts(conn, ids, marks)
    files = _files_summaries(conn, ids, marks)
    views = {}
    for row in rows:
        job_id = row[0]
        job = records.job_view(
            row, runs.get(job_id, ()), phases.get(job_id, ()), devices.get(job_id, ())
        )
        views[job_id] = msgspec.structs.replace(
            job, tests=tests.get(job_id), files=files.get(job_id)
        )
    return views


def _by_job(rows: Iterable[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    """Rows whose first column is a job id, grouped by it (that column left out), each
    group in the order read."""
    grouped: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row[1:])
    return grouped


def _test_counts(conn: sqlite3.Connection, ids: list[str], marks: str) -> dict[str, TestCounts]:
    """Each job's cases of its latest run with a complete report, by result (jobs no run
    of which has one are left out), as sqlite_tests.test_summary counts them."""
    latest: dict[str, tuple[int, TestCounts]] = {}
    for job_id, attempt, passed, failed, error, skipped in conn.execute(
        "SELECT job_id, attempt, sum(passed), sum(failed), sum(error), sum(skipped)"
        f" FROM test_reports WHERE job_id IN ({marks}) AND complete = 1"
        " GROUP BY job_id, attempt",
        ids,
    ):
        if job_id not in latest or attempt > latest[job_id][0]:
            latest[job_id] = (attempt, records.test_counts(passed, failed, error, skipped))
    return {job_id: counts for job_id, (_, counts) in latest.items()}


def _files_summaries(
    conn: sqlite3.Connection, ids: list[str], marks: str
) -> dict[str, FilesSummary]:
    """Each job's latest run that kept or refused files, counted, as
    sqlite_files.files_summary counts it (jobs with none are left out). Which jobs have
    any is one statement; only those are counted."""
    latest = conn.execute(
        "SELECT job_id, max(attempt) FROM ("
        f"SELECT job_id, attempt FROM run_files WHERE job_id IN ({marks})"
        f" UNION ALL SELECT job_id, attempt FROM run_files_refused WHERE job_id IN ({marks})"
        " UNION ALL SELECT job_id, attempt FROM runs"
        f" WHERE job_id IN ({marks}) AND files_refused_unlisted > 0"
        ") GROUP BY job_id",
        ids,
    ).fetchall()
    return {job_id: sqlite_files.counted(conn, job_id, attempt) for job_id, attempt in latest}
