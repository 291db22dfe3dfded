"""Test reports in the store: a report parsed and stored as a run's test cases (counted in
the metrics), a refused one counted and logged once; and a data dir made before the store
had test cases opens, keeps its jobs and takes cases."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import pytest

from protocol.state import Phase
from switchboard.metrics import REGISTRY
from switchboard.models import TestCase, TestCounts
from switchboard.reports.ingest import ReportOutcome, store_report
from switchboard.store.schema import SCHEMA, SCHEMA_VERSION
from switchboard.store.sqlite import SQLiteStore
from switchboard.store.sqlite_tests import CASES_PAGE, CASES_PAGE_OF_RESULT
from tests.store_setup import HELLO, assigned_job, state
from tests.test_junit import GO

pytestmark = pytest.mark.process  # reports parse in a child process


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def store(tmp_path):
    made = SQLiteStore(tmp_path / "db.sqlite3")
    await made.open()
    yield made
    await made.close()


async def test_a_report_is_parsed_stored_and_counted(store):
    await assigned_job(store)
    before = {r: _sample("switchboard_test_cases_total", result=r) for r in ("passed", "failed")}
    outcome = await store_report(store, "j1", 1, "out/go.xml", GO)
    assert outcome == ReportOutcome(counts=TestCounts(passed=1, failed=1, skipped=1, total=3))
    assert await store.test_summary("j1") == outcome.counts
    page = await store.test_cases("j1", result="failed")
    assert [(c.suite, c.name, c.report) for c in page.items] == [
        ("example.com/fw/flash", "TestWrite/page_0", "out/go.xml")
    ]
    assert _sample("switchboard_test_cases_total", result="passed") == before["passed"] + 1
    assert _sample("switchboard_test_cases_total", result="failed") == before["failed"] + 1


async def test_a_refused_report_is_counted_logged_once_and_stores_nothing(store, caplog):
    await assigned_job(store)
    before = _sample("switchboard_reports_refused_total", why="dtd")
    bomb = b'<!DOCTYPE t [<!ENTITY a "aaaa">]><testsuite name="&a;"/>'
    with caplog.at_level(logging.INFO, logger="switchboard.reports"):
        outcome = await store_report(store, "j1", 1, "out/bomb.xml", bomb)
    assert outcome.counts is None and outcome.refused and "DTD" in outcome.refused
    assert _sample("switchboard_reports_refused_total", why="dtd") == before + 1
    lines = [r for r in caplog.records if r.name == "switchboard.reports"]
    assert len(lines) == 1 and "out/bomb.xml" in lines[0].getMessage()
    assert lines[0].exc_info is None
    assert await store.test_summary("j1") is None
    big = await store_report(store, "j1", 1, "out/big.xml", GO, max_bytes=len(GO) - 1)
    assert big.refused and "over the cap" in big.refused


async def test_a_report_of_no_known_run_stores_nothing(store):
    assert await store_report(store, "nope", 1, "r.xml", GO) == ReportOutcome()
    assert await store.test_cases("nope") is None


async def test_a_version_4_data_dir_opens_and_takes_test_cases(tmp_path):
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await assigned_job(old)
    await old.close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE test_cases; DROP TABLE test_reports; PRAGMA user_version = 4;")
    conn.close()
    upgraded = SQLiteStore(path, upgrade=True)
    await upgraded.open()
    try:
        assert (await upgraded.get_job("j1")).phase == Phase.ASSIGNED
        assert await upgraded.test_summary("j1") is None
        assert (await store_report(upgraded, "j1", 1, "r.xml", GO)).counts is not None
        await upgraded.supervisor_connected(HELLO)
        await upgraded.apply_events("s1", [state(1, Phase.SUCCEEDED)])
        assert await upgraded.delete_job("j1") == "deleted"
    finally:
        await upgraded.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION


def test_metric_labels_are_the_parsers_words():
    from switchboard import metrics
    from switchboard.models import TEST_RESULTS
    from switchboard.reports.junit import REFUSAL_KINDS

    assert metrics.TEST_RESULTS == TEST_RESULTS
    assert metrics.REPORT_REFUSALS == REFUSAL_KINDS


@pytest.mark.parametrize(
    ("query", "args", "index"),
    [
        (CASES_PAGE, ("j", 1, 0, "j", 1, 100), "test_cases_by_run"),
        (CASES_PAGE_OF_RESULT, ("j", 1, "failed", 0, "j", 1, 100), "test_cases_by_result"),
    ],
)
def test_a_page_of_cases_is_read_off_an_index_in_order(query, args, index):
    """A page costs its size, not the run's 100,000 cases: no sort, no scan."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + query, args))
    assert f"SEARCH test_cases USING INDEX {index}" in plan, plan
    assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan


async def test_storing_a_large_report_never_holds_the_writer_long(store):
    """100,000 cases take seconds to write: other writes go through in between."""
    await assigned_job(store)
    cases = [
        TestCase("suite", "pkg.mod.Class", f"test_{n}", "passed", 0.01, "m" * 100)
        for n in range(100_000)
    ]
    start = time.perf_counter()
    storing = asyncio.create_task(store.add_test_cases("j1", 1, "r.xml", cases))
    waits = []
    while not storing.done():
        began = time.perf_counter()
        await store.set_dispatch_paused(False)
        waits.append(time.perf_counter() - began)
    took = time.perf_counter() - start
    assert await storing
    assert (await store.test_summary("j1")).total == 100_000
    assert len(waits) >= 10, (waits, took)
    # Each wait is one chunk of the report's writes at most; one may also take a pause of
    # a machine shared with other work, so the second longest is the one held to it.
    second_longest = sorted(waits)[-2]
    assert second_longest < max(took / 5, 0.05), (sorted(waits)[-3:], took)
