"""Placement in the PostgreSQL store (sqlite_placement.py's SQL, translated): what a
dispatch pass reads and the runs it creates.

Replicas may place at once: a run is created with the supervisor's row locked first, then
the job's row claimed with FOR UPDATE SKIP LOCKED (a job another replica is placing is
left out, as one no longer queued is), so no job gets two runs and the lock order is the
same everywhere (supervisor, then job). A job of a concurrency key also takes the key's
transaction lock, without waiting (another replica placing a job of the key now: it
waits for a later pass), and is placed only if no other job of the key is active: two
replicas never run two jobs of one key at once.

A job group's roles may be placed on supervisors whose sockets other replicas hold
(`lock_hosts`): their StartJobs go as commands (postgres_replicas.add_starts). Since a
supervisor's slots may then be taken by two replicas, every placement counts them under
the supervisor's row lock (`free_slots`), not only from the pass's snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from collections.abc import Set as AbstractSet

from protocol.messages import RunRef
from protocol.state import Phase
from switchboard.models import ActiveRun, Assignment, Counts, QueuedJob
from switchboard.sealing import Keyring, SecretsUnreadable
from switchboard.store import postgres_devices, records
from switchboard.store.postgres_engine import Connection
from switchboard.store.postgres_jobs import end_queued_job
from switchboard.store.postgres_runs import record_phase
from switchboard.store.schema import ACTIVE_LITERALS
from switchboard.store.sqlite_placement import active_run, unreadable_end
from switchboard.store.sqlite_secrets import spec_to_start


async def lock_hosts(conn: Connection, supervisor_ids: Collection[str], me: str) -> dict[str, bool]:
    """Lock the rows of these supervisors in id order (as every placement takes them, so
    two replicas placing never wait on each other in a circle): of those connected to
    some replica and not drained, whether their socket is on replica `me`."""
    rows = await conn.fetch(
        "SELECT id, replica = $2, connected = 1 AND replica IS NOT NULL AND drained = 0"
        ' FROM supervisors WHERE id = ANY($1::text[]) ORDER BY id COLLATE "C" FOR UPDATE',
        sorted(supervisor_ids),
        me,
    )
    return {r[0]: bool(r[1]) for r in rows if r[2]}


async def free_slots(conn: Connection, supervisor_ids: Collection[str]) -> dict[str, int]:
    """The free slots of these supervisors now (their max_jobs less their active runs);
    the caller holds their rows' locks, so no other placement takes any meanwhile."""
    rows = await conn.fetch(
        "SELECT s.id, s.max_jobs - (SELECT count(*) FROM runs r WHERE r.supervisor_id = s.id"
        f" AND r.phase IN ({ACTIVE_LITERALS})) FROM supervisors s WHERE s.id = ANY($1::text[])",
        list(supervisor_ids),
    )
    return {r[0]: int(r[1]) for r in rows}


async def assign_run(
    conn: Connection,
    job_id: str,
    supervisor_id: str,
    now: float,
    keyring: Keyring,
    checked: AbstractSet[str] = frozenset(),
) -> Assignment | None:
    """The job's next run, on that supervisor, with its secret values opened for the
    StartJob and its devices granted; None if the job is no longer queued (or another
    writer holds it), if its devices are not free now, or if its secret values can't be
    opened (it is rejected)."""
    await conn.execute("SELECT 1 FROM supervisors WHERE id = $1 FOR UPDATE", supervisor_id)
    row = await conn.fetchrow(
        "SELECT j.attempts, j.spec, s.sealed FROM jobs j"
        " LEFT JOIN job_secrets s ON s.job_id = j.id"
        " WHERE j.id = $1 AND j.phase = 'queued' AND j.cancel_requested = 0"
        " FOR UPDATE OF j SKIP LOCKED",
        job_id,
    )
    if row is None:
        return None
    try:
        spec = spec_to_start(job_id, row[1], row[2], keyring)
    except SecretsUnreadable as exc:
        await end_queued_job(conn, job_id, unreadable_end(job_id, str(exc), now))
        return None
    if spec.concurrency is not None and not await _key_free(conn, job_id, spec.concurrency.key):
        return None  # another job of its key runs, or is being placed: it waits
    attempt = row[0] + 1
    # The supervisor's row lock (above) keeps its devices: no other writer grants them now.
    granted = await postgres_devices.grant(conn, job_id, attempt, supervisor_id, spec, checked)
    if granted is None:
        return None  # its devices were taken, or went bad, since the plan: it waits
    await conn.execute(
        "UPDATE jobs SET phase = 'assigned', attempts = $1, updated_at = $2,"
        " queue_deadline = NULL, unschedulable = NULL WHERE id = $3",
        attempt,
        now,
        job_id,
    )
    await conn.execute(
        "INSERT INTO runs (job_id, attempt, supervisor_id, phase, created_at)"
        " VALUES ($1, $2, $3, 'assigned', $4)",
        job_id,
        attempt,
        supervisor_id,
        now,
    )
    await record_phase(conn, job_id, attempt, Phase.ASSIGNED, None, None, now)
    return Assignment(job_id, attempt, supervisor_id, spec, tuple(granted))


#: The first key of the transaction locks on concurrency keys (pg_advisory_xact_lock's
#: two-int form; the second is the key's hash).
_KEY_LOCKS = 0x5B0C


async def _key_free(conn: Connection, job_id: str, key: str) -> bool:
    """This transaction holds the concurrency key's lock (not waiting for it: a writer
    placing a job of the key holds it until it commits) and no other job of the key is
    active."""
    if not await conn.fetchval(
        "SELECT pg_try_advisory_xact_lock($1, hashtext($2))", _KEY_LOCKS, key
    ):
        return False
    busy = await conn.fetchval(
        "SELECT 1 FROM jobs WHERE concurrency_key = $1 AND id != $2"
        f" AND phase IN ({ACTIVE_LITERALS}) LIMIT 1",
        key,
        job_id,
    )
    return busy is None


async def no_job_ready(conn: Connection, now: float) -> bool:
    """True if no queued job waits ready to be placed."""
    row = await conn.fetchval(
        "SELECT 1 FROM jobs WHERE phase = 'queued' AND unschedulable IS NULL"
        " AND waiting_for IS NULL AND gang IS NULL"
        " AND (not_before IS NULL OR not_before <= $1) LIMIT 1",
        now,
    )
    return row is None


async def busy_keys(conn: Connection) -> frozenset[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT concurrency_key FROM jobs WHERE concurrency_key IS NOT NULL"
        f" AND phase IN ({ACTIVE_LITERALS})"
    )
    return frozenset(r[0] for r in rows)


async def resources_in_use(conn: Connection) -> dict[str, dict[str, int]]:
    used: dict[str, dict[str, int]] = {}
    for supervisor_id, resources in await conn.fetch(
        "SELECT r.supervisor_id, j.resources FROM runs r JOIN jobs j ON j.id = r.job_id"
        f" WHERE r.phase IN ({ACTIVE_LITERALS}) AND j.resources != '{{}}'"
    ):
        records.add_resources(used, supervisor_id, resources)
    return used


async def queued_jobs(
    conn: Connection, limit: int, after: tuple[int, int] | None = None, marked: bool = False
) -> list[QueuedJob]:
    page = ""
    args: list[object] = [time.time(), limit]
    if after is not None:
        page = " AND (priority < $3 OR (priority = $3 AND seq > $4))"
        args += [after[0], after[1]]
    rows = await conn.fetch(
        "SELECT id, seq, priority, spec, queued_at, concurrency_key, unschedulable,"
        " (SELECT device_id FROM device_checks c WHERE c.job_id = jobs.id)"
        " FROM jobs WHERE phase = 'queued'"
        f" AND unschedulable IS {'NOT NULL' if marked else 'NULL'} AND waiting_for IS NULL"
        " AND gang IS NULL"
        f" AND (not_before IS NULL OR not_before <= $1){page}"
        " ORDER BY priority DESC, seq LIMIT $2",
        *args,
    )
    return [
        QueuedJob(r[0], r[1], r[2], records.decode_spec(r[3]), r[4], r[5], r[6], r[7]) for r in rows
    ]


async def next_backoff_end(conn: Connection) -> float | None:
    when: float | None = await conn.fetchval(
        "SELECT min(not_before) FROM jobs WHERE phase = 'queued' AND not_before > $1",
        time.time(),
    )
    return when


async def active_runs(conn: Connection, supervisor_id: str, keyring: Keyring) -> list[ActiveRun]:
    rows = await conn.fetch(
        "SELECT r.job_id, r.attempt, r.phase, j.cancel_requested, j.spec, s.sealed"
        " FROM runs r JOIN jobs j ON j.id = r.job_id"
        " LEFT JOIN job_secrets s ON s.job_id = r.job_id"
        f" WHERE r.supervisor_id = $1 AND r.phase IN ({ACTIVE_LITERALS})",
        supervisor_id,
    )
    # Runs still `assigned` may need their StartJob again, with their devices.
    assigned = [(r[0], r[1]) for r in rows if r[2] == Phase.ASSIGNED]  # (active_run)
    devices = {key: await postgres_devices.run_devices(conn, *key) for key in assigned}
    return [active_run(tuple(row), keyring, lambda j, a: devices[(j, a)]) for row in rows]


async def active_run_refs(
    conn: Connection, supervisor_ids: Collection[str]
) -> dict[str, set[RunRef]]:
    refs: dict[str, set[RunRef]] = {i: set() for i in supervisor_ids}
    rows = await conn.fetch(
        "SELECT supervisor_id, job_id, attempt FROM runs"
        f" WHERE supervisor_id = ANY($1::text[]) AND phase IN ({ACTIVE_LITERALS})",
        list(refs),
    )
    for supervisor_id, job_id, attempt in rows:
        refs[supervisor_id].add(RunRef(job_id, attempt))
    return refs


async def set_unschedulable(conn: Connection, reasons: dict[str, str | None]) -> None:
    if reasons:
        await conn.executemany(
            "UPDATE jobs SET unschedulable = $1 WHERE id = $2 AND phase = 'queued'"
            " AND waiting_for IS NULL",  # a chained job's note is its wait (postgres_chains)
            [(reason, job_id) for job_id, reason in reasons.items()],
        )


async def queue_length(conn: Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM jobs WHERE phase = 'queued'")
    return count


async def counts(conn: Connection) -> Counts:
    jobs = await conn.fetch("SELECT phase, count(*) FROM jobs GROUP BY phase")
    queued = await conn.fetch(
        "SELECT CASE WHEN unschedulable IS NOT NULL THEN 'unschedulable'"
        " WHEN not_before > $1 THEN 'backoff' ELSE 'ready' END, count(*)"
        " FROM jobs WHERE phase = 'queued' GROUP BY 1",
        time.time(),
    )
    drained = await conn.fetch("SELECT id FROM supervisors WHERE connected = 1 AND drained = 1")
    return Counts({r[0]: r[1] for r in jobs}, {r[0]: r[1] for r in queued}, [r[0] for r in drained])
