"""The parser process: reports are parsed in a child (switchboard.reports.worker), refusals
cross back as ReportRefused, and a child that dies refuses only the report it was reading."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from switchboard.models import TestCounts
from switchboard.reports import worker
from switchboard.reports.junit import ReportRefused
from tests.test_junit import GO

pytestmark = pytest.mark.process


async def test_a_report_is_parsed_in_the_child() -> None:
    report = await worker.parse_report(GO)
    assert report.counts == TestCounts(passed=1, failed=1, error=0, skipped=1, total=3)
    assert [case.result for case in report.cases] == ["passed", "failed", "skipped"]


async def test_refusals_cross_back() -> None:
    with pytest.raises(ReportRefused) as caught:  # by size, without the child
        await worker.parse_report(b"<testsuite/>" + b" " * 100, max_bytes=100)
    assert caught.value.kind == "too_large"
    with pytest.raises(ReportRefused) as caught:  # by the child
        await worker.parse_report(b'<!DOCTYPE x [<!ENTITY a "b">]><testsuite/>')
    assert caught.value.kind == "dtd" and caught.value.reason


async def test_a_dead_parser_refuses_its_report_and_the_next_gets_a_fresh_one() -> None:
    await worker.parse_report(GO)  # the child is up
    pool = worker._executor()
    (child,) = pool._processes.values()  # type: ignore[union-attr]
    # A report that keeps the child busy, killed while it parses.
    busy = b"<testsuite>" + b'<testcase name="t"/>' * 90_000 + b"</testsuite>"
    parsing = worker.parse_report(busy)
    task = asyncio.ensure_future(parsing)
    await asyncio.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(ReportRefused) as caught:
        await task
    assert caught.value.kind == "crashed"
    report = await worker.parse_report(GO)
    assert report.counts.total == 3
    worker.shutdown()
