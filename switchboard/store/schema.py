"""The SQLite schema at the baseline of the migrations (store/migrations.py), and how a
database from before the baseline catches up with it."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection

from protocol.state import ACTIVE, TERMINAL, Phase


def sql_literals(phases: Collection[Phase]) -> str:
    """The phases as an SQL list of literals, in the order Phase defines them: a partial
    index and the queries meant to use it must spell the same list."""
    return ", ".join(f"'{phase.value}'" for phase in Phase if phase in phases)


#: Every ending (protocol.state.TERMINAL), written out for the schema and the queries that
#: use its partial index.
TERMINAL_LITERALS = sql_literals(TERMINAL)
#: The same lists as query parameters: ("?, ?, ...", the values).
TERMINAL_PHASES = tuple(p.value for p in Phase if p in TERMINAL)
TERMINAL_SQL = ",".join("?" * len(TERMINAL_PHASES))
ACTIVE_PHASES = tuple(p.value for p in Phase if p in ACTIVE)
ACTIVE_SQL = ",".join("?" * len(ACTIVE_PHASES))
#: The active phases written out (PostgreSQL's queries, which bind no lists).
ACTIVE_LITERALS = sql_literals(ACTIVE)

#: The version SCHEMA creates: where the numbered migrations (store/migrations.py) start.
#: SCHEMA is not edited any more; a change to the schema is a new migration.
BASELINE_VERSION = 6
#: This code's version: the baseline and every migration past it (a test checks it is
#: BASELINE_VERSION + len(migrations.MIGRATIONS)). A database of another version is served
#: only once upgraded (an older one), or not at all (a newer one).
SCHEMA_VERSION = 15
#: Versions before the baseline that reach it in one step: their changes only added
#: tables, indexes and triggers, which SCHEMA creates where missing, and the columns of
#: ADDED_COLUMNS. (From 3,
#: the store also moves secret values out of the stored specs: see
#: sqlite_secrets.seal_legacy_secrets.) Version 5 added test_reports and test_cases; 6
#: added run_files, run_files_refused and runs.files_refused_unlisted.
ADDITIVE_UPGRADES_FROM = frozenset({2, 3, 4, 5})

#: Columns added to tables that older databases already have (SCHEMA holds them too, for a
#: new database): table -> [(column, its definition, the statement that fills it in for
#: the rows already there, or None)].
ADDED_COLUMNS: dict[str, list[tuple[str, str, str | None]]] = {
    "runs": [
        (
            "output_bytes",
            "INTEGER NOT NULL DEFAULT 0",
            "UPDATE runs SET output_bytes = (SELECT coalesce(sum(length(o.data)), 0)"
            " FROM output o WHERE o.job_id = runs.job_id AND o.attempt = runs.attempt)",
        ),
        ("output_truncated", "TEXT", None),
        ("files_refused_unlisted", "INTEGER NOT NULL DEFAULT 0", None),
    ],
    "artifacts": [("uploaded_by", "TEXT", None), ("last_used", "REAL", None)],
    "jobs": [("owner", "TEXT", None)],
    "supervisors": [("protocol", "TEXT NOT NULL DEFAULT ''", None)],
}
#: Tables added since version 2 that start with rows derived from the others: the version
#: that added one, and the statement filling it in for a database older than that (it
#: may run again if an upgrade was interrupted: it adds only what is missing).
FILLED_TABLES: dict[str, tuple[int, str]] = {
    "job_artifacts": (
        4,
        "INSERT OR IGNORE INTO job_artifacts (job_id, digest)"
        " SELECT id, digest FROM (SELECT id, coalesce("
        "json_extract(CAST(spec AS TEXT), '$.backend.module'),"
        " json_extract(CAST(spec AS TEXT), '$.backend.image_artifact')) AS digest FROM jobs)"
        " WHERE digest IS NOT NULL",
    ),
}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL,
    -- a supervisor token may be bound to one supervisor id
    supervisor_id TEXT
);
-- a supervisor's host credentials, looked up when it enrols or is unenrolled
CREATE INDEX IF NOT EXISTS tokens_by_supervisor ON tokens (supervisor_id)
    WHERE supervisor_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS artifacts (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    -- the id of the token that uploaded it first, and when a job last named it
    uploaded_by TEXT,
    last_used REAL
);
-- The artifacts each job names (a Wasm module, an image tarball): what a delete and
-- retention check before an artifact goes.
CREATE TABLE IF NOT EXISTS job_artifacts (
    digest TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (digest, job_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_artifacts_by_job ON job_artifacts (job_id);
CREATE TABLE IF NOT EXISTS supervisors (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{{}}',
    backends TEXT NOT NULL DEFAULT '[]',
    resources TEXT NOT NULL DEFAULT '{{}}',
    max_jobs INTEGER NOT NULL DEFAULT 1,
    software TEXT NOT NULL DEFAULT '',
    session INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    connected INTEGER NOT NULL DEFAULT 0,
    -- set by operators: a drained supervisor takes no new runs; operator labels override
    -- the advertised ones
    drained INTEGER NOT NULL DEFAULT 0,
    operator_labels TEXT NOT NULL DEFAULT '{{}}',
    first_seen REAL NOT NULL,
    connected_at REAL,
    last_seen REAL,
    -- the protocol version its last connection negotiated ('': not known)
    protocol TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    spec BLOB NOT NULL,
    phase TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    -- copied out of the spec for queries that must not decode it
    labels TEXT NOT NULL DEFAULT '{{}}',
    resources TEXT NOT NULL DEFAULT '{{}}',
    concurrency_key TEXT,
    timeout_s REAL,
    -- the id of the token that submitted it (NULL: submitted before jobs had owners)
    owner TEXT,
    -- when the job entered the queue (aging), and when its queue timeout ends
    queued_at REAL NOT NULL,
    queue_deadline REAL,
    unschedulable TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    -- a restarted job waits in the queue until then (its backoff), and the delay it got
    not_before REAL,
    backoff_s REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_phase ON jobs (phase, priority DESC, seq);
-- the dispatcher's queue: what some registered supervisor could run, in placement order
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (priority DESC, seq)
    WHERE phase = 'queued' AND unschedulable IS NULL;
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (concurrency_key, phase)
    WHERE concurrency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_queue_deadline ON jobs (queue_deadline)
    WHERE queue_deadline IS NOT NULL;
-- a token's queued jobs (its queue quota: covering, so counting them reads no job row;
-- without `phase` in it SQLite preferred jobs_by_owner and read every job of the token)
-- and its jobs (the list's owner filter)
CREATE INDEX IF NOT EXISTS jobs_queued_by_owner ON jobs (owner, phase) WHERE phase = 'queued';
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq);
-- the resources of the jobs that hold some: a dispatch pass reads those of every active run
-- from here, never from the job's row, where they lie after the spec (up to 1 MiB: reading
-- them there walks the spec's overflow pages, and a few large jobs slowed every pass)
CREATE INDEX IF NOT EXISTS jobs_resources ON jobs (id, resources) WHERE resources != '{{}}';
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    attempt INTEGER,
    actor TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
CREATE TABLE IF NOT EXISTS switchboard_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    supervisor_id TEXT,
    phase TEXT NOT NULL,
    stage TEXT,
    message TEXT,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    error_kind TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    -- bytes of output stored for the run (all streams), and the streams cut at the
    -- per-run output cap (comma-separated; NULL: none)
    output_bytes INTEGER NOT NULL DEFAULT 0,
    output_truncated TEXT,
    -- output files the supervisor refused beyond those it listed (run_files_refused)
    files_refused_unlisted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS runs_by_supervisor ON runs (supervisor_id, phase);
CREATE INDEX IF NOT EXISTS runs_by_phase ON runs (phase, supervisor_id);
CREATE TABLE IF NOT EXISTS run_phases (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    phase TEXT NOT NULL,
    stage TEXT,
    message TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_phases_by_run ON run_phases (job_id, attempt, id);
CREATE TABLE IF NOT EXISTS output (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stream TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS output_by_run ON output (job_id, attempt, stream, offset);
-- ended jobs by when they ended (a terminal job is not updated again): the dashboard's
-- finished-per-minute and recent failures
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (updated_at)
    WHERE phase IN ({TERMINAL_LITERALS});
-- Every change a job list would show, in commit order, for the live feed (pruned by it)
-- and the requests waiting for jobs to end (switchboard/waiters.py).
CREATE TABLE IF NOT EXISTS job_changes (
    rev INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS job_inserted AFTER INSERT ON jobs
BEGIN
    INSERT INTO job_changes (job_id) VALUES (NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS job_updated
    AFTER UPDATE OF phase, unschedulable, reason, exit_code, attempts, cancel_requested ON jobs
BEGIN
    INSERT INTO job_changes (job_id) VALUES (NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS job_deleted AFTER DELETE ON jobs
BEGIN
    INSERT INTO job_changes (job_id, deleted) VALUES (OLD.id, 1);
END;
-- The secret parameter values of a job that may still run, sealed (switchboard/sealing.py);
-- the job's spec holds them replaced. Dropped once the job has ended: no run needs them.
CREATE TABLE IF NOT EXISTS job_secrets (
    job_id TEXT PRIMARY KEY,
    sealed BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS job_secrets_dropped_at_end AFTER UPDATE OF phase ON jobs
    WHEN NEW.phase IN ({TERMINAL_LITERALS})
BEGIN
    DELETE FROM job_secrets WHERE job_id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS job_secrets_dropped_with_job AFTER DELETE ON jobs
BEGIN
    DELETE FROM job_secrets WHERE job_id = OLD.id;
END;
-- Each supervisor session: when it connected, when and why it ended.
CREATE TABLE IF NOT EXISTS supervisor_sessions (
    supervisor_id TEXT NOT NULL,
    session INTEGER NOT NULL,
    connected_at REAL NOT NULL,
    disconnected_at REAL,
    reason TEXT,
    PRIMARY KEY (supervisor_id, session)
);
-- The JUnit reports of each run (switchboard/reports), with their cases counted by result:
-- a job's summary reads these few rows, never its cases. A report's cases are written in
-- several short transactions; they count (are listed) once its row is `complete`, and a
-- report stored again replaces the older row in that same transaction.
CREATE TABLE IF NOT EXISTS test_reports (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    report TEXT NOT NULL,
    passed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    error INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS test_reports_by_run ON test_reports (job_id, attempt, report);
-- Their test cases, in report order (id); `report_id`: the test_reports row they belong to.
CREATE TABLE IF NOT EXISTS test_cases (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    report TEXT NOT NULL,
    report_id INTEGER NOT NULL,
    suite TEXT NOT NULL,
    classname TEXT NOT NULL,
    name TEXT NOT NULL,
    result TEXT NOT NULL,
    duration_s REAL,
    message TEXT
);
-- a run's cases in order, and those of one result (a listing filtered by result); a
-- replaced report's, to delete
CREATE INDEX IF NOT EXISTS test_cases_by_run ON test_cases (job_id, attempt);
CREATE INDEX IF NOT EXISTS test_cases_by_result ON test_cases (job_id, attempt, result);
CREATE INDEX IF NOT EXISTS test_cases_by_report ON test_cases (report_id);
-- The output files each run kept (its `files` events), each an artifact: a link keeps the
-- artifact from retention and deletion while the job exists. `report`: for a file the
-- spec names as a JUnit report, 'pending', 'stored' or 'refused' (`report_error` why).
CREATE TABLE IF NOT EXISTS run_files (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    path TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    report TEXT,
    report_error TEXT,
    PRIMARY KEY (job_id, attempt, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_files_by_digest ON run_files (digest);
-- reports still to parse (a restart takes them up again)
CREATE INDEX IF NOT EXISTS run_files_pending ON run_files (job_id) WHERE report = 'pending';
-- The output files a run did not keep, and why (the supervisor's refusals, and files
-- listed under a digest never uploaded).
CREATE TABLE IF NOT EXISTS run_files_refused (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, path)
) WITHOUT ROWID;
"""


class SchemaMismatch(RuntimeError):
    """The database was made by another version of the switchboard."""


def catch_up_to_baseline(
    conn: sqlite3.Connection,
    version: int,
    legacy: Callable[[sqlite3.Connection, int], None] | None,
) -> None:
    """In the transaction that records BASELINE_VERSION: fill the tables added since
    `version` (SCHEMA has created them, and add_columns the columns), and let `legacy`
    move the data of `version`."""
    for since, fill in FILLED_TABLES.values():
        if version < since:
            conn.execute(fill)
    if legacy is not None:
        legacy(conn, version)


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The columns of a table (none: no such table)."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def add_columns(conn: sqlite3.Connection) -> None:
    """Give an older database's tables the columns added since (each with its backfill in
    the same transaction, so a crash leaves it before or after, never half done)."""
    for table, columns in ADDED_COLUMNS.items():
        have = _columns(conn, table)
        if not have:
            continue  # a table SCHEMA is about to create, with every column
        for column, definition, backfill in columns:
            if column in have:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                if backfill is not None:
                    conn.execute(backfill)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
