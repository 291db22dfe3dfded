"""The migration framework of the SQLite store (switchboard/store/migrations.py): new and
upgraded databases end in the same place, an upgrade is asked for, backed up first, done
step by step (an interrupted step is tried again), and a newer database is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from protocol.spec import JobSpec, NoopBackend
from protocol.state import Phase
from switchboard.store.migrations import (
    MIGRATIONS,
    Migration,
    SchemaOutdated,
    SchemaTooNew,
    apply_schema,
)
from switchboard.store.schema import BASELINE_VERSION, SCHEMA_VERSION, SchemaMismatch
from switchboard.store.sqlite import SQLiteStore
from tests.store_setup import version_5_database

pytestmark = pytest.mark.unit

SPEC = JobSpec(name="noop", backend=NoopBackend())


def _short_names(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE jobs ADD COLUMN short TEXT")
    conn.execute("UPDATE jobs SET short = substr(name, 1, 3)")


#: A step past the baseline, for these tests: a column, filled in from another.
NEXT = Migration(BASELINE_VERSION + 1, "jobs get a short name", _short_names)


def _shape(path: Path) -> dict[str, object]:
    """What a schema is made of: each table's columns (with type, default, key), indexes
    and triggers with their SQL, and the version; the order columns were added in aside."""
    conn = sqlite3.connect(path)
    try:
        shape: dict[str, object] = {"version": conn.execute("PRAGMA user_version").fetchone()[0]}
        for kind, name, sql in conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ):
            if kind == "table":
                columns = conn.execute(f"PRAGMA table_info({name})").fetchall()
                shape[name] = sorted(tuple(c[1:]) for c in columns)
            else:
                shape[name] = " ".join(sql.split())
        return shape
    finally:
        conn.close()


def test_the_version_is_the_baseline_and_every_step_past_it():
    assert SCHEMA_VERSION == BASELINE_VERSION + len(MIGRATIONS)
    assert [m.to for m in MIGRATIONS] == list(range(BASELINE_VERSION + 1, SCHEMA_VERSION + 1))


async def test_the_previous_release_upgraded_has_the_schema_a_new_database_gets(tmp_path):
    fresh = SQLiteStore(tmp_path / "new" / "db.sqlite3")
    await fresh.open()
    await fresh.close()
    upgraded = SQLiteStore(version_5_database(tmp_path / "old" / "db.sqlite3"), upgrade=True)
    await upgraded.open()
    try:
        assert (await upgraded.get_job("01a2513091290000de2fa94f")).phase == Phase.SUCCEEDED
    finally:
        await upgraded.close()
    assert _shape(upgraded.path) == _shape(fresh.path)


async def test_an_older_database_is_upgraded_only_when_asked(tmp_path):
    path = version_5_database(tmp_path / "data" / "switchboard.sqlite3")
    before = _shape(path)
    with pytest.raises(SchemaOutdated) as refused:
        await SQLiteStore(path).open()
    assert f"schema version 5, this switchboard needs {SCHEMA_VERSION}" in str(refused.value)
    assert f"switchboard db upgrade --data-dir {path.parent}" in str(refused.value)
    assert "switchboard serve --upgrade" in str(refused.value)
    assert _shape(path) == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no copy: nothing done


async def test_a_copy_is_made_before_the_upgrade(tmp_path, caplog):
    path = version_5_database(tmp_path / "data" / "switchboard.sqlite3")
    store = SQLiteStore(path, upgrade=True)
    await store.open()
    await store.close()
    (copy,) = path.parent.glob("*.bak")
    assert copy.name.startswith("switchboard.sqlite3.schema-5.")
    assert copy.stat().st_mode & 0o777 == 0o600
    assert _shape(copy)["version"] == 5
    assert f"a copy of it as it was is at {copy}" in caplog.text
    # Upgraded once: opening it again changes nothing and copies nothing.
    again = SQLiteStore(path)
    await again.open()
    await again.close()
    assert len(list(path.parent.glob("*.bak"))) == 1


async def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "data" / "switchboard.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    await store.create_job("kept", SPEC)
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    for upgrade in (False, True):
        with pytest.raises(SchemaTooNew, match="made by a newer switchboard"):
            await SQLiteStore(path, upgrade=upgrade).open()


async def test_a_database_older_than_any_upgrade_is_refused(tmp_path):
    path = version_5_database(tmp_path / "db.sqlite3")
    sqlite3.connect(path).execute("PRAGMA user_version = 1").connection.close()
    with pytest.raises(SchemaMismatch, match="move the data dir aside"):
        await SQLiteStore(path, upgrade=True).open()


def test_a_new_database_is_made_at_the_baseline_and_taken_through_every_step(tmp_path):
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    apply_schema(conn, steps=(NEXT,))
    assert conn.execute("PRAGMA user_version").fetchone() == (BASELINE_VERSION + 1,)
    assert "short" in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}


def test_each_step_runs_once_in_order_and_an_interrupted_one_again(tmp_path):
    path = version_5_database(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)

    def breaks(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE jobs ADD COLUMN half_done TEXT")
        raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError, match="disk is full"):
        apply_schema(conn, upgrade=True, steps=(NEXT, Migration(NEXT.to + 1, "breaks", breaks)))
    # The baseline and the first step are done; the second left nothing behind.
    assert conn.execute("PRAGMA user_version").fetchone() == (NEXT.to,)
    assert "half_done" not in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert conn.execute("SELECT name, short FROM jobs ORDER BY seq").fetchall() == [
        ("passes", "pas"),
        ("fails", "fai"),
        ("waits", "wai"),
    ]

    fixed = Migration(NEXT.to + 1, "fixed", lambda conn: None)
    apply_schema(conn, upgrade=True, steps=(NEXT, fixed))  # NEXT again would fail: it's done
    assert conn.execute("PRAGMA user_version").fetchone() == (NEXT.to + 1,)


def test_steps_out_of_order_are_a_programming_error(tmp_path):
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    skipped = Migration(BASELINE_VERSION + 2, "skips one", lambda conn: None)
    with pytest.raises(AssertionError, match="where 7 is next"):
        apply_schema(conn, steps=(skipped,))
