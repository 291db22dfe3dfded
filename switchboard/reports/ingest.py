"""A run's JUnit report, from bytes to stored test cases: parsed in a child process, stored
in one transaction, counted. A refused report is counted, logged once, and its reason
returned for the caller to show with the run's files; it never raises.
"""

from __future__ import annotations

import logging

import msgspec

from switchboard import metrics
from switchboard.models import TestCounts
from switchboard.reports.junit import (
    MAX_MESSAGE_CHARS,
    MAX_REPORT_BYTES,
    MAX_TEST_CASES,
    ReportRefused,
)
from switchboard.reports.worker import parse_report
from switchboard.store.base import Store

log = logging.getLogger("switchboard.reports")


class ReportOutcome(msgspec.Struct, frozen=True):
    """What became of one report: its cases counted (stored), or why it was refused.
    Neither: there is no such run (nothing stored)."""

    counts: TestCounts | None = None
    refused: str | None = None


async def store_report(
    store: Store,
    job_id: str,
    attempt: int,
    report_path: str,
    data: bytes,
    *,
    max_bytes: int = MAX_REPORT_BYTES,
    max_cases: int = MAX_TEST_CASES,
    max_message: int = MAX_MESSAGE_CHARS,
) -> ReportOutcome:
    """Parse `data` (the run's output file `report_path`) and store its test cases."""
    try:
        report = await parse_report(
            data, max_bytes=max_bytes, max_cases=max_cases, max_message=max_message
        )
    except ReportRefused as exc:
        metrics.REPORTS_REFUSED.labels(exc.kind).inc()
        log.warning(
            "JUnit report %r of job %s attempt %d refused: %s",
            report_path,
            job_id,
            attempt,
            exc.reason,
        )
        return ReportOutcome(refused=exc.reason)
    if not await store.add_test_cases(job_id, attempt, report_path, report.cases):
        return ReportOutcome()
    counts = report.counts
    for result in metrics.TEST_RESULTS:
        metrics.TEST_CASES.labels(result).inc(getattr(counts, result))
    return ReportOutcome(counts=counts)
