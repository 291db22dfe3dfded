"""Schema migrations of the SQLite store: what brings a data dir made by an older release
up to this one's SCHEMA_VERSION, and the checks that refuse what can't be served.

A new database is created at the baseline (schema.SCHEMA, version BASELINE_VERSION) and
then taken through every step of MIGRATIONS, so a new and an upgraded database end in
the same place by the same path. A change to the schema is a new Migration at the end of
MIGRATIONS (and SCHEMA_VERSION one higher); SCHEMA itself is never edited again.

An existing database older than this code is upgraded only when asked (`switchboard db
upgrade`, or `switchboard serve --upgrade`): the file is copied aside first with SQLite's
backup API, then each step runs in a transaction of its own that also records the version
it reached, so an interrupted upgrade resumes at the step that did not finish. A database
newer than this code is refused: an older release can't know what a newer one stored.

Before the baseline, versions 2 to 5 only ever added tables, indexes, triggers and the
columns of schema.ADDED_COLUMNS: they reach the baseline in one step that adds what is
missing (schema.catch_up_to_baseline).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.limits import EMPTY_DIGEST
from switchboard import datadir
from switchboard.store import schema
from switchboard.store.schema import BASELINE_VERSION, SCHEMA_VERSION, SchemaMismatch
from switchboard.store.uri import shown_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """The step from version `to - 1` to `to`: `apply` runs inside the transaction that
    records `to`, and may run SQL or Python (moving data) on the connection."""

    to: int
    summary: str
    apply: Callable[[sqlite3.Connection], None]


def _chained_jobs(conn: sqlite3.Connection) -> None:
    # A chained job waits for this job to end (its inputs are that job's output files).
    # (Added only where missing: a database dressed up as an older one by a test has it.)
    if "waiting_for" not in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}:
        conn.execute("ALTER TABLE jobs ADD COLUMN waiting_for TEXT")
    # Chained jobs waiting, by the job they wait for (switchboard.chains).
    conn.execute(
        "CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (waiting_for)"
        " WHERE waiting_for IS NOT NULL"
    )


#: Version 8: the hardware lab (docs/lab.md), new tables only ("if not exists": a database
#: dressed up as an older one by a test has them).
HARDWARE_LAB = """
-- Every device a supervisor declares (its hello's inventory), with its health. `health`:
-- unknown, good, bad, maintenance, looping, retired. The last health check: its result
-- ('pass' or 'fail'), when, and the job that ran it.
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    supervisor_id TEXT NOT NULL,
    class TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    console INTEGER NOT NULL DEFAULT 0,
    power INTEGER NOT NULL DEFAULT 0,
    health TEXT NOT NULL DEFAULT 'unknown',
    health_reason TEXT NOT NULL DEFAULT '',
    health_at REAL NOT NULL,
    check_result TEXT,
    check_at REAL,
    check_job TEXT,
    first_seen REAL NOT NULL,
    last_declared REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_by_supervisor ON devices (supervisor_id, class);
-- Every change of a device's health: who made it (an operator's token, or a job), and why.
CREATE TABLE IF NOT EXISTS device_health_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    at REAL NOT NULL,
    health_from TEXT,
    health_to TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    job_id TEXT
);
CREATE INDEX IF NOT EXISTS device_health_by_device ON device_health_history (device_id, seq);
-- The devices granted to each run: a device's holder is the active run among its rows.
CREATE TABLE IF NOT EXISTS run_devices (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_devices_by_device ON run_devices (device_id, job_id, attempt);
-- The health-check jobs of devices: a check is pending until `result` is written ('pass',
-- 'fail' or 'error') once its job has ended.
CREATE TABLE IF NOT EXISTS device_checks (
    job_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    result TEXT,
    ended_at REAL
);
CREATE INDEX IF NOT EXISTS device_checks_pending ON device_checks (device_id) WHERE result IS NULL;
"""


#: Version 9: reservations of the lab's devices, with leases (docs/lab.md).
RESERVATIONS = """
-- A reservation of devices: `state` waiting -> held -> released or expired. `expires_at`:
-- while waiting, when it expires unless its client refreshes it, while held, when its
-- lease ends. `owner`: the token that asked (its revocation releases the reservation).
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    owner TEXT,
    actor TEXT NOT NULL,
    class TEXT,
    selector TEXT NOT NULL DEFAULT '{}',
    count INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    duration_s REAL NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    refreshed_at REAL NOT NULL,
    granted_at REAL,
    expires_at REAL NOT NULL,
    ended_at REAL,
    end_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (state, expires_at)
    WHERE state IN ('waiting', 'held');
-- The devices a reservation was granted (it holds them while its state is 'held').
CREATE TABLE IF NOT EXISTS reservation_devices (
    reservation_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (reservation_id, device_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservation_devices_by_device
    ON reservation_devices (device_id, reservation_id);
-- Queued jobs naming a reservation (the spec's `reservation`, copied): canceled when it ends.
CREATE INDEX IF NOT EXISTS jobs_queued_by_reservation ON jobs (reservation)
    WHERE reservation IS NOT NULL AND phase = 'queued';
"""


def _reservations(conn: sqlite3.Connection) -> None:
    # (Added only where missing: a database dressed up as an older one by a test has it.)
    if "reservation" not in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}:
        conn.execute("ALTER TABLE jobs ADD COLUMN reservation TEXT")
    _statements(RESERVATIONS)(conn)


def _statements(script: str) -> Callable[[sqlite3.Connection], None]:
    """A step running `script`'s statements (no `;` inside its comments)."""

    def apply(conn: sqlite3.Connection) -> None:
        # One statement at a time: executescript would commit the step's transaction first.
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)

    return apply


def _empty_artifact(conn: sqlite3.Connection) -> None:
    # The artifact of no bytes, always stored: an empty output file is listed under it,
    # never uploaded (protocol.limits.EMPTY_DIGEST). Its file: artifacts.ArtifactFiles.
    conn.execute(
        "INSERT OR IGNORE INTO artifacts (digest, size, created_at) VALUES (?, 0, ?)",
        (EMPTY_DIGEST, time.time()),
    )


#: Each power command run on a device (docs/lab.md "Power"): who asked, what, and how it
#: went, for the device's history.
POWER_CALLS = """
CREATE TABLE IF NOT EXISTS device_power_calls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    result TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    job_id TEXT
);
CREATE INDEX IF NOT EXISTS device_power_by_device ON device_power_calls (device_id, seq)
"""


#: Version 12: devices asked for one by one (run_devices.role, .pos: the grant's order)
#: and job groups (docs/lab.md, "Job groups").
#: The columns it adds: run_devices.role and .pos (the grant's order), and jobs.gang: the
#: group whose placement a queued job waits for (all its roles at once), NULL once placed
#: and for every job of no group.
JOB_GROUP_COLUMNS = (
    ("run_devices", "role", "TEXT"),
    ("run_devices", "pos", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "gang", "TEXT"),
)
JOB_GROUPS = """
CREATE INDEX IF NOT EXISTS jobs_gang ON jobs (gang) WHERE gang IS NOT NULL;
-- Job groups, placed all or none: `stop_reason` says why its roles were stopped (an
-- essential role failed), `ended_at` when its last role ended.
CREATE TABLE IF NOT EXISTS job_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT,
    actor TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    placed_at REAL,
    ended_at REAL,
    stop_reason TEXT
);
CREATE INDEX IF NOT EXISTS job_groups_open ON job_groups (created_at) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS job_groups_by_time ON job_groups (created_at);
-- Each group's roles, in the order given, each one job.
CREATE TABLE IF NOT EXISTS group_roles (
    group_id TEXT NOT NULL,
    role TEXT NOT NULL,
    pos INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    essential INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (group_id, role)
);
CREATE UNIQUE INDEX IF NOT EXISTS group_roles_by_job ON group_roles (job_id)
"""


def _job_groups(conn: sqlite3.Connection) -> None:
    # (Columns added only where missing: a database dressed up as an older one by a test
    # has them.)
    for table, column, definition in JOB_GROUP_COLUMNS:
        if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    _statements(JOB_GROUPS)(conn)


#: Version 14: what several replicas on one PostgreSQL database share (docs/deployment.md,
#: "Several replicas"): the leader lease, the replicas alive, the replica holding each
#: supervisor's connection, commands for a supervisor whose socket another replica holds.
#: One process serves an SQLite file: it leaves them empty (they are kept so that both
#: stores have one schema).
REPLICAS = """
CREATE TABLE IF NOT EXISTS switchboard_lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS switchboard_replicas (
    id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS supervisor_commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    supervisor_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS supervisor_commands_by_supervisor
    ON supervisor_commands (supervisor_id, seq)
"""


def _replicas(conn: sqlite3.Connection) -> None:
    if "replica" not in {row[1] for row in conn.execute("PRAGMA table_info(supervisors)")}:
        conn.execute("ALTER TABLE supervisors ADD COLUMN replica TEXT")
    _statements(REPLICAS)(conn)


#: Version 14: commands between replicas carry more than StopJobs: a `kind` (stop; start:
#: send the stored run's StartJob; power: run a device's power command and write back
#: the answer), a power command's device and action, when it was taken, and its answer
#: (JSON) for the replica that asked (docs/deployment.md, "Commands between replicas").
COMMAND_COLUMNS = (
    ("kind", "TEXT NOT NULL DEFAULT 'stop'"),
    ("device_id", "TEXT"),
    ("action", "TEXT"),
    ("taken_at", "REAL"),
    ("answer", "TEXT"),
)


def _command_kinds(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(supervisor_commands)")}
    for column, definition in COMMAND_COLUMNS:
        if column not in have:
            conn.execute(f"ALTER TABLE supervisor_commands ADD COLUMN {column} {definition}")


#: Every step past the baseline, in order: MIGRATIONS[i] reaches BASELINE_VERSION + i + 1.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        7, "jobs.waiting_for: chained jobs wait for the job they take files from", _chained_jobs
    ),
    Migration(
        8,
        "the hardware lab: devices, their health history, checks, runs' devices",
        _statements(HARDWARE_LAB),
    ),
    Migration(9, "reservations of devices, with leases; jobs.reservation", _reservations),
    Migration(10, "the empty artifact, always stored (empty output files)", _empty_artifact),
    Migration(
        11,
        "device_power_calls: each power command, for the device's history",
        _statements(POWER_CALLS),
    ),
    Migration(
        12,
        "devices asked for one by one (run_devices.role), job groups placed all or none",
        _job_groups,
    ),
    Migration(
        13,
        "replicas on one database: the leader lease, replicas, supervisors.replica, commands",
        _replicas,
    ),
    Migration(
        14,
        "commands between replicas: start and power (with its answer) besides stop",
        _command_kinds,
    ),
    Migration(
        15,
        "artifact bytes in the database on PostgreSQL (artifact_chunks); SQLite's stay files",
        lambda conn: None,
    ),
)

#: The oldest version an upgrade reaches; an older file must be made again.
OLDEST_UPGRADABLE = min(schema.ADDITIVE_UPGRADES_FROM)


class SchemaTooNew(SchemaMismatch):
    """The database was made by a newer switchboard than this one."""


class SchemaOutdated(SchemaMismatch):
    """The database is older than this code and may be upgraded, but was not asked to."""


def database_name(database: Path | str) -> str:
    """How messages name a database: an SQLite file's path, or a PostgreSQL URI (a str,
    its password left out)."""
    if isinstance(database, Path):
        return f"database {database}"
    return f"PostgreSQL database {shown_uri(database)}"


def upgrade_command(database: Path | str) -> str:
    """The command that upgrades the database of the data dir holding `database` (a
    Path), or the PostgreSQL database `database` names (a URI)."""
    if isinstance(database, Path):
        return f"switchboard db upgrade --data-dir {database.parent}"
    return f"switchboard db upgrade --database {shown_uri(database)}"


def check_version(
    version: int,
    database: Path | str,
    *,
    upgrade: bool,
    current: int = SCHEMA_VERSION,
    oldest: int = OLDEST_UPGRADABLE,
) -> None:
    """Refuse a database of `version` (it has tables) that code at schema version
    `current` can't serve as it is: the rule for both stores. `database`: the SQLite
    file's path, or a PostgreSQL URI (see database_name); `oldest`: the oldest version
    its store upgrades from."""
    name = database_name(database)
    sqlite = isinstance(database, Path)
    if version > current:
        restore = (
            "restore the backup an upgrade left beside the database"
            if sqlite
            else "restore the backup made before its upgrade"
        )
        raise SchemaTooNew(
            f"the {name} has schema version {version}, made by a newer switchboard;"
            f" this one knows versions up to {current}: run the newer release (or"
            f" {restore})"
        )
    if version < oldest:
        raise SchemaMismatch(
            f"the database has schema version {version}, this switchboard needs"
            f" {current} and upgrades from {oldest} on: "
            + (
                "move the data dir aside (or start with a new --data-dir)"
                if sqlite
                else "serve a new database"
            )
        )
    if version < current and not upgrade:
        backed_up = (
            "it backs the database up first"
            if sqlite
            else "back it up first: `switchboard db backup --database`"
        )
        raise SchemaOutdated(
            f"the {name} has schema version {version}, this switchboard needs"
            f" {current}: upgrade it with `{upgrade_command(database)}` ({backed_up}),"
            " or start with `switchboard serve --upgrade`"
        )


def database_version(path: Path) -> int | None:
    """The schema version of the database at `path`, read without changing it (None: no
    database there yet, or one with no tables)."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (tables,) = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        ).fetchone()
    finally:
        conn.close()
    return int(version) if tables else None


def _path_of(conn: sqlite3.Connection) -> Path:
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return Path(file)
    raise AssertionError("a connection always has a main database")


def backup(conn: sqlite3.Connection, version: int) -> Path:
    """Copy the database beside itself (private, like the data dir) before it is
    upgraded from `version`; return the copy's path."""
    path = _path_of(conn)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.schema-{version}.{stamp}.bak")
    datadir.private_file(target)
    copy = sqlite3.connect(target)
    try:
        conn.backup(copy)
    finally:
        copy.close()
    return target


def apply_schema(
    conn: sqlite3.Connection,
    legacy: Callable[[sqlite3.Connection, int], None] | None = None,
    *,
    upgrade: bool = False,
    steps: Sequence[Migration] = MIGRATIONS,
) -> None:
    """Create the tables of a new database, or check an existing one's version and, when
    `upgrade` is given, back it up and bring it up to this one. `legacy(conn, version)`
    moves the data of a version before the baseline, in the step that reaches it.
    `steps`: the migrations past the baseline (tests give their own)."""
    current = BASELINE_VERSION + len(steps)
    for number, step in enumerate(steps, BASELINE_VERSION + 1):
        assert step.to == number, f"migration to {step.to} where {number} is next"
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    (tables,) = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
    if not tables:
        conn.executescript(schema.SCHEMA)
        _in_transaction(conn, BASELINE_VERSION, lambda conn: None)
        for step in steps:
            _in_transaction(conn, step.to, step.apply)
        return
    if version == current:
        return
    check_version(version, _path_of(conn), upgrade=upgrade, current=current)
    copy = backup(conn, version)
    log.warning(
        "upgrading the database %s from schema version %d to %d; a copy of it as it was is at %s",
        _path_of(conn),
        version,
        current,
        copy,
    )
    if version < BASELINE_VERSION:
        schema.add_columns(conn)
        conn.executescript(schema.SCHEMA)
        _in_transaction(
            conn,
            BASELINE_VERSION,
            lambda conn: schema.catch_up_to_baseline(conn, version, legacy),
        )
        version = BASELINE_VERSION
    for step in steps[version - BASELINE_VERSION :]:
        log.info("schema version %d: %s", step.to, step.summary)
        _in_transaction(conn, step.to, step.apply)
    log.warning("the database is at schema version %d", current)


def _in_transaction(
    conn: sqlite3.Connection, version: int, apply: Callable[[sqlite3.Connection], None]
) -> None:
    """Run `apply` and record `version` in one transaction: both happen or neither."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        apply(conn)
        conn.execute(f"PRAGMA user_version = {int(version)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
