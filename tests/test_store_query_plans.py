"""Queries on paths every job or every dispatch pass takes read only an index: their cost
must not grow with what one token or one large job put in the store."""

from __future__ import annotations

import sqlite3

import pytest

from switchboard.store.schema import ACTIVE_PHASES, SCHEMA
from switchboard.store.sqlite_jobs import QUEUED_BY_OWNER
from switchboard.store.sqlite_placement import RESOURCES_IN_USE

pytestmark = pytest.mark.unit


def _plan(query: str, args: tuple) -> str:
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    return " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + query, args))


def test_counting_a_tokens_queued_jobs_reads_only_the_covering_index():
    """Each submission counts its token's queued jobs for its quota: never by reading
    every job the token ever submitted (that cost grew with the token's history and
    halved single-POST throughput)."""
    plan = _plan(QUEUED_BY_OWNER, ("t",))
    assert "COVERING INDEX jobs_queued_by_owner" in plan, plan


def test_the_resources_of_active_runs_come_from_the_covering_index():
    """Every dispatch pass reads the resources of every active run: from the index, never
    from the job's row, where they lie after a spec of up to 1 MiB."""
    plan = _plan(RESOURCES_IN_USE, ACTIVE_PHASES)
    assert "COVERING INDEX jobs_resources" in plan, plan
