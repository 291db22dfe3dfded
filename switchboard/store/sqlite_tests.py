"""Test reports in the SQLite store: each run's JUnit reports, counted (test_reports), and
their test cases (test_cases). Every function takes the open connection and runs inside
the caller's transaction. A job's delete removes both (sqlite_jobs.delete_job).

A report near the cap holds 100,000 cases, seconds of writing: the store writes them in
short transactions (begin_report, add_cases, finish_report, then drop_replaced for the
rows of an older copy), so the one writer is never held long. Readers see a report's cases
only once finish_report has marked its row complete, all at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any

from switchboard.models import (
    StoredTestCase,
    TestCase,
    TestCasePage,
    TestCounts,
    TestResult,
)
from switchboard.store import records

#: Test cases one write transaction stores or deletes.
CASES_PER_WRITE = 2000

_COLUMNS = "id, attempt, report, suite, classname, name, result, duration_s, message"
_COMPLETE = "SELECT id FROM test_reports WHERE job_id = ? AND attempt = ? AND complete = 1"
#: A page of a run's cases, and of those of one result: read in id order off an index
#: (test_cases_by_run, test_cases_by_result), never sorted; only complete reports' cases.
CASES_PAGE = (
    f"SELECT {_COLUMNS} FROM test_cases WHERE job_id = ? AND attempt = ? AND id > ?"
    f" AND report_id IN ({_COMPLETE}) ORDER BY id LIMIT ?"
)
CASES_PAGE_OF_RESULT = (
    f"SELECT {_COLUMNS} FROM test_cases WHERE job_id = ? AND attempt = ? AND result = ?"
    f" AND id > ? AND report_id IN ({_COMPLETE}) ORDER BY id LIMIT ?"
)


#: A store's write: runs a function of a connection in a transaction, its value once
#: committed (the function's value may be awaitable: the PostgreSQL store awaits it).
Write = Callable[[Callable[[Any], Any]], Awaitable[Any]]


async def add_report(
    write: Write,
    family: ModuleType,
    job_id: str,
    attempt: int,
    report: str,
    cases: Sequence[TestCase],
) -> bool:
    """Store.add_test_cases for either store: `family` is the store's module of these
    functions (this one, or postgres_tests), `write` its transaction. In short
    transactions: the cases are listed, and counted, once the last has marked the report
    complete; then the rows of an older copy (or, if the job was deleted meanwhile, this
    one's) are dropped a few at a time."""
    report_id = await write(lambda conn: family.begin_report(conn, job_id, attempt, report, cases))
    if report_id is None:
        return False
    step = CASES_PER_WRITE
    for start in range(0, len(cases), step):

        def add(conn: Any, chunk: Sequence[TestCase] = cases[start : start + step]) -> Any:
            return family.add_cases(conn, job_id, attempt, report, report_id, chunk)

        await write(add)
    replaced = await write(lambda conn: family.finish_report(conn, report_id))
    for gone in [report_id] if replaced is None else replaced:

        def drop(conn: Any, gone: int = gone) -> Any:
            return family.drop_replaced(conn, gone, step)

        while await write(drop):
            pass
    return replaced is not None


def begin_report(
    conn: sqlite3.Connection, job_id: str, attempt: int, report: str, cases: Sequence[TestCase]
) -> int | None:
    """The row of a report about to be stored (not complete: not counted, its cases not
    listed); None if there is no such run."""
    if (
        conn.execute(
            "SELECT 1 FROM runs WHERE job_id = ? AND attempt = ?", (job_id, attempt)
        ).fetchone()
        is None
    ):
        return None
    by = records.report_counts(cases)
    cursor = conn.execute(
        "INSERT INTO test_reports (job_id, attempt, report, passed, failed, error, skipped)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (job_id, attempt, report, by["passed"], by["failed"], by["error"], by["skipped"]),
    )
    return int(cursor.lastrowid or 0)


def add_cases(
    conn: sqlite3.Connection,
    job_id: str,
    attempt: int,
    report: str,
    report_id: int,
    cases: Sequence[TestCase],
) -> None:
    """Store some of a report's cases, in order."""
    conn.executemany(
        "INSERT INTO test_cases (job_id, attempt, report, report_id, suite, classname, name,"
        " result, duration_s, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                job_id,
                attempt,
                report,
                report_id,
                c.suite,
                c.classname,
                c.name,
                c.result,
                c.duration_s,
                c.message,
            )
            for c in cases
        ],
    )


def finish_report(conn: sqlite3.Connection, report_id: int) -> list[int] | None:
    """Mark a report complete, and forget the other rows of the same report of the run (an
    older copy, or one a crash left incomplete): the ids whose cases are now to drop. None
    if the report's row is gone (its job was deleted meanwhile)."""
    row = conn.execute(
        "UPDATE test_reports SET complete = 1 WHERE id = ? RETURNING job_id, attempt, report",
        (report_id,),
    ).fetchone()
    if row is None:
        return None
    replaced = conn.execute(
        "DELETE FROM test_reports WHERE job_id = ? AND attempt = ? AND report = ? AND id != ?"
        " RETURNING id",
        (*row, report_id),
    ).fetchall()
    return [r[0] for r in replaced]


def drop_replaced(conn: sqlite3.Connection, report_id: int, max_rows: int) -> int:
    """Delete up to `max_rows` cases of a report row no longer stored; how many."""
    cursor = conn.execute(
        "DELETE FROM test_cases WHERE id IN"
        " (SELECT id FROM test_cases WHERE report_id = ? LIMIT ?)",
        (report_id, max_rows),
    )
    return cursor.rowcount


def _latest_attempt(conn: sqlite3.Connection, job_id: str) -> int | None:
    """The job's latest run that has a (complete) report."""
    (attempt,) = conn.execute(
        "SELECT max(attempt) FROM test_reports WHERE job_id = ? AND complete = 1", (job_id,)
    ).fetchone()
    return attempt


def test_summary(conn: sqlite3.Connection, job_id: str) -> TestCounts | None:
    """The cases of the job's latest run that has a report, by result (None: no run has)."""
    attempt = _latest_attempt(conn, job_id)
    if attempt is None:
        return None
    passed, failed, error, skipped = conn.execute(
        "SELECT sum(passed), sum(failed), sum(error), sum(skipped) FROM test_reports"
        " WHERE job_id = ? AND attempt = ? AND complete = 1",
        (job_id, attempt),
    ).fetchone()
    return records.test_counts(passed, failed, error, skipped)


def test_cases(
    conn: sqlite3.Connection,
    job_id: str,
    result: TestResult | None,
    attempt: int | None,
    limit: int,
    after: int | None,
) -> TestCasePage | None:
    """One page of a run's cases in report order, those with `result` only (if given),
    after the case with id `after`. The run: `attempt`, or the latest with a report. None:
    no such job."""
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
        return None
    if attempt is None:
        attempt = _latest_attempt(conn, job_id)
        if attempt is None:
            return TestCasePage(attempt=None, items=[])
    run = (job_id, attempt)
    if result is None:
        rows = conn.execute(CASES_PAGE, (*run, after or 0, *run, limit)).fetchall()
    else:
        args = (*run, result, after or 0, *run, limit)
        rows = conn.execute(CASES_PAGE_OF_RESULT, args).fetchall()
    items = [StoredTestCase(*row) for row in rows]
    next_after = items[-1].id if len(items) == limit else None
    return TestCasePage(attempt=attempt, items=items, next_after=next_after)
