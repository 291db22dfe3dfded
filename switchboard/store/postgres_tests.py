"""Test reports in the PostgreSQL store (sqlite_tests.py's SQL, translated): each run's
JUnit reports, counted, and their cases, written in short transactions and listed only
once their report is complete (see sqlite_tests.py). Every function runs inside the
caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from switchboard.models import StoredTestCase, TestCase, TestCasePage, TestCounts, TestResult
from switchboard.store import records
from switchboard.store.postgres_engine import Connection, affected

_COLUMNS = "id, attempt, report, suite, classname, name, result, duration_s, message"
_COMPLETE = "SELECT id FROM test_reports WHERE job_id = $1 AND attempt = $2 AND complete = 1"


async def begin_report(
    conn: Connection, job_id: str, attempt: int, report: str, cases: Sequence[TestCase]
) -> int | None:
    if (
        await conn.fetchval(
            "SELECT 1 FROM runs WHERE job_id = $1 AND attempt = $2", job_id, attempt
        )
        is None
    ):
        return None
    by = records.report_counts(cases)
    report_id: int = await conn.fetchval(
        "INSERT INTO test_reports (job_id, attempt, report, passed, failed, error, skipped)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        job_id,
        attempt,
        report,
        by["passed"],
        by["failed"],
        by["error"],
        by["skipped"],
    )
    return report_id


async def add_cases(
    conn: Connection,
    job_id: str,
    attempt: int,
    report: str,
    report_id: int,
    cases: Sequence[TestCase],
) -> None:
    """Store some of a report's cases, in order (COPY: one round trip for them all)."""
    await conn.copy_records_to_table(
        "test_cases",
        columns=[
            *("job_id", "attempt", "report", "report_id", "suite", "classname", "name"),
            *("result", "duration_s", "message"),
        ],
        records=[(job_id, attempt, report, report_id, *_case_row(c)) for c in cases],
    )


def _case_row(c: TestCase) -> tuple[object, ...]:
    return (c.suite, c.classname, c.name, c.result, c.duration_s, c.message)


async def finish_report(conn: Connection, report_id: int) -> list[int] | None:
    row = await conn.fetchrow(
        "UPDATE test_reports SET complete = 1 WHERE id = $1 RETURNING job_id, attempt, report",
        report_id,
    )
    if row is None:
        return None
    replaced = await conn.fetch(
        "DELETE FROM test_reports WHERE job_id = $1 AND attempt = $2 AND report = $3"
        " AND id != $4 RETURNING id",
        *row,
        report_id,
    )
    return [r[0] for r in replaced]


async def drop_replaced(conn: Connection, report_id: int, max_rows: int) -> int:
    return affected(
        await conn.execute(
            "DELETE FROM test_cases WHERE id IN"
            " (SELECT id FROM test_cases WHERE report_id = $1 LIMIT $2)",
            report_id,
            max_rows,
        )
    )


async def _latest_attempt(conn: Connection, job_id: str) -> int | None:
    attempt: int | None = await conn.fetchval(
        "SELECT max(attempt) FROM test_reports WHERE job_id = $1 AND complete = 1", job_id
    )
    return attempt


async def test_summary(conn: Connection, job_id: str) -> TestCounts | None:
    attempt = await _latest_attempt(conn, job_id)
    if attempt is None:
        return None
    row = await conn.fetchrow(
        "SELECT sum(passed)::bigint, sum(failed)::bigint, sum(error)::bigint,"
        " sum(skipped)::bigint FROM test_reports"
        " WHERE job_id = $1 AND attempt = $2 AND complete = 1",
        job_id,
        attempt,
    )
    assert row is not None  # aggregates always give a row
    return records.test_counts(*row)


async def test_cases(
    conn: Connection,
    job_id: str,
    result: TestResult | None,
    attempt: int | None,
    limit: int,
    after: int | None,
) -> TestCasePage | None:
    if await conn.fetchval("SELECT 1 FROM jobs WHERE id = $1", job_id) is None:
        return None
    if attempt is None:
        attempt = await _latest_attempt(conn, job_id)
        if attempt is None:
            return TestCasePage(attempt=None, items=[])
    of_result = "" if result is None else " AND result = $5"
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM test_cases WHERE job_id = $1 AND attempt = $2 AND id > $3"
        f"{of_result} AND report_id IN ({_COMPLETE}) ORDER BY id LIMIT $4",
        job_id,
        attempt,
        after or 0,
        limit,
        *([] if result is None else [result]),
    )
    items = [StoredTestCase(*row) for row in rows]
    next_after = items[-1].id if len(items) == limit else None
    return TestCasePage(attempt=attempt, items=items, next_after=next_after)
