"""Placement in the SQLite store: what a dispatch pass reads (the queue, keys and
resources held, the fleet's load) and the runs it creates, with their secret values opened
for the StartJob.

Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Collection
from collections.abc import Set as AbstractSet

import msgspec

from protocol.messages import RunRef
from protocol.spec import JobSpec
from protocol.state import Phase
from switchboard import lifecycle, metrics
from switchboard.models import ActiveRun, Assignment, Counts, QueuedJob
from switchboard.sealing import Keyring, SecretsUnreadable
from switchboard.store import records, sqlite_devices
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL
from switchboard.store.sqlite_jobs import end_queued_job
from switchboard.store.sqlite_runs import record_phase
from switchboard.store.sqlite_secrets import spec_to_start

log = logging.getLogger("switchboard.store")

_spec_decoder = msgspec.json.Decoder(JobSpec)


def active_run(
    row: tuple,
    keyring: Keyring,
    devices_of: Callable[[str, int], tuple[str, ...]] = lambda job_id, attempt: (),
) -> ActiveRun:
    """A run a supervisor holds. One still `assigned` may need its StartJob again, so its
    secret values are opened (or why they can't be is noted), and its devices read
    (`devices_of(job_id, attempt)`); the others' are left shut."""
    job_id, attempt, phase, cancel_requested, raw, sealed = row
    spec, unreadable = _spec_decoder.decode(raw), None
    devices: tuple[str, ...] = ()
    if phase == Phase.ASSIGNED:
        try:
            spec = spec_to_start(job_id, spec, sealed, keyring)
        except SecretsUnreadable as exc:
            unreadable = str(exc)
        if spec.resources or spec.devices:
            devices = devices_of(job_id, attempt)
    return ActiveRun(
        job_id, attempt, Phase(phase), bool(cancel_requested), spec, unreadable, devices
    )


def assign_run(
    conn: sqlite3.Connection,
    job_id: str,
    supervisor_id: str,
    now: float,
    keyring: Keyring,
    checked: AbstractSet[str] = frozenset(),
) -> Assignment | None:
    """The job's next run, on that supervisor, with its secret values opened for the
    StartJob; None if the job is no longer queued, or if its secret values can't be
    opened (it is rejected: it could never run with this switchboard's keys)."""
    row = conn.execute(
        "SELECT j.attempts, j.spec, s.sealed FROM jobs j"
        " LEFT JOIN job_secrets s ON s.job_id = j.id"
        " WHERE j.id = ? AND j.phase = 'queued' AND j.cancel_requested = 0",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    try:
        spec = spec_to_start(job_id, row[1], row[2], keyring)
    except SecretsUnreadable as exc:
        reject_unreadable(conn, job_id, str(exc), now)
        return None
    attempt = row[0] + 1
    granted = sqlite_devices.grant(conn, job_id, attempt, supervisor_id, spec, checked)
    if granted is None:
        return None  # its devices were taken, or went bad, since the plan: it waits
    conn.execute(
        "UPDATE jobs SET phase = 'assigned', attempts = ?, updated_at = ?,"
        " queue_deadline = NULL, unschedulable = NULL WHERE id = ?",
        (attempt, now, job_id),
    )
    conn.execute(
        "INSERT INTO runs (job_id, attempt, supervisor_id, phase, created_at)"
        " VALUES (?, ?, ?, 'assigned', ?)",
        (job_id, attempt, supervisor_id, now),
    )
    record_phase(conn, job_id, attempt, Phase.ASSIGNED, None, None, now)
    return Assignment(job_id, attempt, supervisor_id, spec, tuple(granted))


def reject_unreadable(conn: sqlite3.Connection, job_id: str, why: str, now: float) -> None:
    end_queued_job(conn, job_id, unreadable_end(job_id, why, now))


def unreadable_end(job_id: str, why: str, now: float) -> lifecycle.JobEnd:
    """How a job whose secret values can't be opened ends at placement (counted, logged)."""
    end = lifecycle.secrets_unreadable(why, now)
    metrics.secrets_unreadable("placement")
    log.warning("job %s rejected: %s", job_id, end.reason)
    return end


def no_job_ready(conn: sqlite3.Connection, now: float) -> bool:
    """True if no queued job waits ready to be placed (the dispatcher's queue is empty)."""
    row = conn.execute(
        "SELECT 1 FROM jobs WHERE phase = 'queued' AND unschedulable IS NULL"
        " AND waiting_for IS NULL AND gang IS NULL"
        " AND (not_before IS NULL OR not_before <= ?) LIMIT 1",
        (now,),
    ).fetchone()
    return row is None


def busy_keys(conn: sqlite3.Connection) -> frozenset[str]:
    rows = conn.execute(
        "SELECT DISTINCT concurrency_key FROM jobs WHERE concurrency_key IS NOT NULL"
        f" AND phase IN ({ACTIVE_SQL})",
        ACTIVE_PHASES,
    )
    return frozenset(r[0] for r in rows)


#: The resources each active run holds, from the covering index alone (see the schema).
RESOURCES_IN_USE = (
    "SELECT r.supervisor_id, j.resources FROM runs r"
    " JOIN jobs j INDEXED BY jobs_resources ON j.id = r.job_id"
    f" WHERE r.phase IN ({ACTIVE_SQL}) AND j.resources != '{{}}'"
)


def resources_in_use(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    used: dict[str, dict[str, int]] = {}
    for supervisor_id, resources in conn.execute(RESOURCES_IN_USE, ACTIVE_PHASES):
        records.add_resources(used, supervisor_id, resources)
    return used


def queued_jobs(
    conn: sqlite3.Connection,
    limit: int,
    after: tuple[int, int] | None = None,
    marked: bool = False,
) -> list[QueuedJob]:
    page = ""
    args: list[object] = [time.time()]
    if after is not None:
        page = " AND (priority < ? OR (priority = ? AND seq > ?))"
        args += [after[0], after[0], after[1]]
    rows = conn.execute(
        "SELECT id, seq, priority, spec, queued_at, concurrency_key, unschedulable,"
        " (SELECT device_id FROM device_checks c WHERE c.job_id = jobs.id)"
        " FROM jobs WHERE phase = 'queued'"
        f" AND unschedulable IS {'NOT NULL' if marked else 'NULL'} AND waiting_for IS NULL"
        " AND gang IS NULL"
        f" AND (not_before IS NULL OR not_before <= ?){page}"
        " ORDER BY priority DESC, seq LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [
        QueuedJob(r[0], r[1], r[2], _spec_decoder.decode(r[3]), r[4], r[5], r[6], r[7])
        for r in rows
    ]


def next_backoff_end(conn: sqlite3.Connection) -> float | None:
    (when,) = conn.execute(
        "SELECT min(not_before) FROM jobs WHERE phase = 'queued' AND not_before > ?",
        (time.time(),),
    ).fetchone()
    return when


def active_runs(conn: sqlite3.Connection, supervisor_id: str, keyring: Keyring) -> list[ActiveRun]:
    rows = conn.execute(
        "SELECT r.job_id, r.attempt, r.phase, j.cancel_requested, j.spec, s.sealed"
        " FROM runs r JOIN jobs j ON j.id = r.job_id"
        " LEFT JOIN job_secrets s ON s.job_id = r.job_id"
        f" WHERE r.supervisor_id = ? AND r.phase IN ({ACTIVE_SQL})",
        (supervisor_id, *ACTIVE_PHASES),
    ).fetchall()
    return [
        active_run(row, keyring, lambda j, a: sqlite_devices.run_devices(conn, j, a))
        for row in rows
    ]


def active_run_refs(
    conn: sqlite3.Connection, supervisor_ids: Collection[str]
) -> dict[str, set[RunRef]]:
    refs: dict[str, set[RunRef]] = {i: set() for i in supervisor_ids}
    ids = list(refs)
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start : start + _IDS_PER_QUERY]
        rows = conn.execute(
            "SELECT supervisor_id, job_id, attempt FROM runs"
            f" WHERE supervisor_id IN ({', '.join('?' * len(chunk))})"
            f" AND phase IN ({ACTIVE_SQL})",
            (*chunk, *ACTIVE_PHASES),
        )
        for supervisor_id, job_id, attempt in rows:
            refs[supervisor_id].add(RunRef(job_id, attempt))
    return refs


#: Ids per query of a batched read (well under SQLite's limit on bound values).
_IDS_PER_QUERY = 500


def set_unschedulable(conn: sqlite3.Connection, reasons: dict[str, str | None]) -> None:
    for job_id, reason in reasons.items():
        conn.execute(
            "UPDATE jobs SET unschedulable = ? WHERE id = ? AND phase = 'queued'"
            " AND waiting_for IS NULL",  # a chained job's note is its wait (sqlite_chains)
            (reason, job_id),
        )


def queue_length(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM jobs WHERE phase = 'queued'").fetchone()[0]


def counts(conn: sqlite3.Connection) -> Counts:
    jobs = dict(conn.execute("SELECT phase, count(*) FROM jobs GROUP BY phase"))
    queued = conn.execute(
        "SELECT CASE WHEN unschedulable IS NOT NULL THEN 'unschedulable'"
        " WHEN not_before > ? THEN 'backoff' ELSE 'ready' END, count(*)"
        " FROM jobs WHERE phase = 'queued' GROUP BY 1",
        (time.time(),),
    )
    drained = conn.execute("SELECT id FROM supervisors WHERE connected AND drained")
    return Counts(jobs, dict(queued), [row[0] for row in drained])
