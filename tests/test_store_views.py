"""The store's dashboard side on disk: the job change log (kept by triggers, so every way a
job changes is in it), the overview's counts, connection history, and opening a database
of the previous schema version."""

from __future__ import annotations

import sqlite3
import time

import pytest

from protocol.state import Phase
from switchboard.store.schema import SCHEMA_VERSION, SchemaMismatch
from switchboard.store.sqlite import SQLiteStore
from tests.store_setup import HELLO, SPEC, state

pytestmark = pytest.mark.unit


async def test_every_job_change_is_logged_in_order(store):
    start = await store.latest_job_change()
    await store.create_job("a", SPEC)
    await store.create_job("b", SPEC)
    await store.supervisor_connected(HELLO)
    await store.assign([("a", "s1")])
    await store.apply_events("s1", [state(1, Phase.RUNNING, job="a")])
    await store.request_cancel("b", "tester")
    assert await store.delete_job("b") == "deleted"
    changes = await store.job_changes(start, 100)
    assert [c.rev for c in changes] == sorted(c.rev for c in changes)
    assert [c.job_id for c in changes if not c.deleted][:2] == ["a", "b"]
    assert {c.job_id for c in changes if not c.deleted} == {"a", "b"}
    assert [c.job_id for c in changes if c.deleted] == ["b"]
    assert changes[-1].deleted
    # the assign and the running report each changed a's phase
    assert sum(c.job_id == "a" for c in changes) >= 3
    assert await store.latest_job_change() == changes[-1].rev
    assert await store.job_changes(changes[-1].rev, 100) == []

    await store.prune_job_changes(keep=2)
    assert [c.rev for c in await store.job_changes(0, 100)] == [c.rev for c in changes[-2:]]


async def test_overview_counts_by_minute_and_lists_failures(store):
    await store.supervisor_connected(HELLO)
    for job_id in ("ok", "bad", "waits"):
        await store.create_job(job_id, SPEC)
    await store.assign([("ok", "s1"), ("bad", "s1")])
    await store.apply_events(
        "s1", [state(1, Phase.SUCCEEDED, job="ok"), state(2, Phase.FAILED, job="bad")]
    )
    overview = await store.overview(time.time(), 5, 10)
    assert (overview.supervisors.online, overview.supervisors.offline) == (1, 0)
    assert [(q.priority, q.count) for q in overview.queue] == [(0, 1)]
    assert len(overview.finished) == 5
    assert (overview.finished[-1].succeeded, overview.finished[-1].failed) == (1, 1)
    assert [j.id for j in overview.recent_failures] == ["bad"]
    # An hour later, the minutes shown hold nothing.
    later = await store.overview(time.time() + 3600, 5, 10)
    assert sum(m.succeeded + m.failed for m in later.finished) == 0

    await store.set_drained("s1", True)
    drained = await store.overview(time.time(), 5, 10)
    assert (drained.supervisors.online, drained.supervisors.draining) == (0, 1)


async def test_connection_history_survives_a_restart(tmp_path):
    path = tmp_path / "db.sqlite3"
    first = SQLiteStore(path)
    await first.open()
    one = await first.supervisor_connected(HELLO)
    await first.supervisor_disconnected("s1", one.session, "heartbeat timeout")
    await first.supervisor_connected(HELLO)
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        await second.forget_connections()  # what a starting switchboard does
        history = await second.connection_records("s1", 10)
    finally:
        await second.close()
    assert [(h.session, h.reason) for h in history] == [
        (2, "the switchboard restarted"),
        (1, "heartbeat timeout"),
    ]
    assert all(h.disconnected_at is not None for h in history)


def _downgrade(path, version: int) -> None:
    """Make the file look like one written by schema `version`: without what came later."""
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE job_changes; DROP TABLE supervisor_sessions; DROP INDEX jobs_ended;"
        f" PRAGMA user_version = {version};"
    )
    conn.close()


async def test_a_version_2_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await old.create_job("kept", SPEC)
    await old.close()
    _downgrade(path, 2)
    upgraded = SQLiteStore(path, upgrade=True)
    await upgraded.open()
    try:
        assert (await upgraded.get_job("kept")).phase == Phase.QUEUED
        await upgraded.create_job("new", SPEC)
        assert [c.job_id for c in await upgraded.job_changes(0, 10)] == ["new"]
    finally:
        await upgraded.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION


async def test_a_version_3_database_gets_job_owners(tmp_path):
    """Version 4 added the jobs' owner column: a version 3 file gets it, its jobs with no
    owner, and quotas count only the jobs that have one."""
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await old.create_job("before", SPEC)
    await old.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP INDEX jobs_queued_by_owner; DROP INDEX jobs_by_owner;"
        " ALTER TABLE jobs DROP COLUMN owner; PRAGMA user_version = 3;"
    )
    conn.close()
    upgraded = SQLiteStore(path, upgrade=True)
    await upgraded.open()
    try:
        assert (await upgraded.get_job("before")).owner is None
        await upgraded.create_jobs([("after", SPEC)], "t", 10, owner="tok", max_queued_per_owner=1)
        assert (await upgraded.get_job("after")).owner == "tok"
    finally:
        await upgraded.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION


async def test_an_older_database_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await old.close()
    _downgrade(path, 1)
    with pytest.raises(SchemaMismatch, match="schema version 1"):
        await SQLiteStore(path, upgrade=True).open()
