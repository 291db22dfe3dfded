"""Job groups in the PostgreSQL store (sqlite_groups.py's SQL, translated): held jobs,
placement all or none, the sweep that stops a group whose essential role failed.

A group is placed with the supervisors' rows locked first, in id order, then each job's
row claimed (postgres_placement.assign_run), as a single job's placement locks them, so
replicas placing at once never wait on each other in a circle; a supervisor's row lock
keeps its devices, as for a single job (postgres_devices.grant).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

from protocol.state import Phase
from switchboard import gangs
from switchboard.models import (
    Assignment,
    GroupSweep,
    GroupView,
    RunOnSupervisor,
    Submitted,
)
from switchboard.sealing import Keyring
from switchboard.store import records
from switchboard.store.postgres_engine import Connection
from switchboard.store.postgres_jobs import cancel_job, insert_jobs
from switchboard.store.postgres_placement import assign_run
from switchboard.store.schema import TERMINAL_LITERALS, TERMINAL_PHASES
from switchboard.store.sqlite_groups import NotAllPlaced
from switchboard.store.sqlite_jobs import NewJob

log = logging.getLogger("switchboard.store")

_COLUMNS = records.GROUP_COLUMNS


async def create_group(
    conn: Connection,
    group_id: str,
    name: str,
    priority: int,
    roles: Sequence[tuple[str, bool, NewJob]],
    actor: str,
    max_queued: int,
    now: float,
    *,
    owner: str | None = None,
    max_per_owner: int | None = None,
) -> list[Submitted]:
    made = await insert_jobs(
        conn,
        [job for _, _, job in roles],
        actor,
        max_queued,
        owner=owner,
        max_per_owner=max_per_owner,
    )
    await conn.execute(
        "INSERT INTO job_groups (id, name, owner, actor, priority, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        group_id,
        name,
        owner,
        actor,
        priority,
        now,
    )
    for pos, (role, essential, job) in enumerate(roles):
        await conn.execute(
            "INSERT INTO group_roles (group_id, role, pos, job_id, essential)"
            " VALUES ($1, $2, $3, $4, $5)",
            group_id,
            role,
            pos,
            job.id,
            int(essential),
        )
        await conn.execute(
            "UPDATE jobs SET gang = $1 WHERE id = $2 AND phase = 'queued'", group_id, job.id
        )
    return made


async def waiting_groups(conn: Connection, limit: int) -> list[tuple[str, list[gangs.RoleNeed]]]:
    groups = await conn.fetch(
        "SELECT g.id FROM job_groups g WHERE g.placed_at IS NULL AND g.ended_at IS NULL"
        " AND g.stop_reason IS NULL"
        " AND EXISTS (SELECT 1 FROM jobs j WHERE j.gang = g.id AND j.phase = 'queued')"
        " ORDER BY g.priority DESC, g.created_at, g.id LIMIT $1",
        limit,
    )
    found = []
    for (group_id,) in groups:
        rows = await conn.fetch(
            "SELECT r.role, r.job_id, j.spec, r.essential FROM group_roles r"
            " JOIN jobs j ON j.id = r.job_id"
            " WHERE r.group_id = $1 AND j.gang = $1 AND j.phase = 'queued'"
            " AND j.cancel_requested = 0 ORDER BY r.pos",
            group_id,
        )
        needs = [
            gangs.RoleNeed(role, job_id, records.decode_spec(spec), bool(essential))
            for role, job_id, spec, essential in rows
        ]
        found.append((group_id, needs))
    return found


async def assign_group(
    conn: Connection,
    group_id: str,
    pairs: Sequence[tuple[str, str]],
    now: float,
    keyring: Keyring,
    checked: AbstractSet[str] = frozenset(),
) -> list[Assignment]:
    """A run for every role, with its devices, or NotAllPlaced (the caller's transaction
    rolls back: nothing is held)."""
    for supervisor_id in sorted({s for _, s in pairs}):
        await conn.execute("SELECT 1 FROM supervisors WHERE id = $1 FOR UPDATE", supervisor_id)
    made = []
    for job_id, supervisor_id in pairs:
        run = await assign_run(conn, job_id, supervisor_id, now, keyring, checked)
        if run is None:
            raise NotAllPlaced(job_id)
        made.append(run)
    await conn.execute("UPDATE jobs SET gang = NULL WHERE gang = $1", group_id)
    await conn.execute("UPDATE job_groups SET placed_at = $1 WHERE id = $2", now, group_id)
    return made


async def _role_states(conn: Connection, group_id: str) -> list[gangs.RoleState]:
    rows = await conn.fetch(
        "SELECT r.role, r.job_id, j.phase, r.essential, j.gang FROM group_roles r"
        " LEFT JOIN jobs j ON j.id = r.job_id WHERE r.group_id = $1 ORDER BY r.pos",
        group_id,
    )
    return [
        gangs.RoleState(role, job_id, Phase(phase) if phase else None, bool(ess), gang is not None)
        for role, job_id, phase, ess, gang in rows
    ]


_TO_SWEEP = (
    "SELECT DISTINCT g.id, g.stop_reason FROM job_groups g"
    " JOIN group_roles r ON r.group_id = g.id LEFT JOIN jobs j ON j.id = r.job_id"
    f" WHERE g.ended_at IS NULL AND (j.id IS NULL OR j.phase IN ({TERMINAL_LITERALS}))"
    " ORDER BY g.id LIMIT $1"
)


async def groups_open(conn: Connection) -> bool:
    found = await conn.fetchval("SELECT 1 FROM job_groups WHERE ended_at IS NULL LIMIT 1")
    return found is not None


async def groups_to_sweep(conn: Connection) -> bool:
    return await conn.fetchval(_TO_SWEEP, 1) is not None


async def sweep(conn: Connection, now: float, limit: int) -> GroupSweep:
    stops: list[RunOnSupervisor] = []
    stopped: list[tuple[str, str]] = []
    for group_id, stop_reason in await conn.fetch(_TO_SWEEP, limit):
        # The group's row first: two replicas sweeping at once stop it once.
        stop_reason = await conn.fetchval(
            "SELECT stop_reason FROM job_groups WHERE id = $1 FOR UPDATE", group_id
        )
        roles = await _role_states(conn, group_id)
        if stop_reason is None and (stop := gangs.to_stop(roles, group_id)) is not None:
            for job_id in stop.cancel:
                result = await cancel_job(conn, job_id, f"group {group_id}", stop.reason)
                if result and result.supervisor_id is not None and result.attempt is not None:
                    stops.append(RunOnSupervisor(job_id, result.attempt, result.supervisor_id))
            await conn.execute(
                "UPDATE job_groups SET stop_reason = $1 WHERE id = $2", stop.reason, group_id
            )
            await conn.execute("UPDATE jobs SET gang = NULL WHERE gang = $1", group_id)
            stopped.append((group_id, stop.reason))
            log.info("group %s stopped: %s", group_id, stop.reason)
            roles = await _role_states(conn, group_id)
        if all(r.phase is None or r.phase.value in TERMINAL_PHASES for r in roles):
            await conn.execute("UPDATE job_groups SET ended_at = $1 WHERE id = $2", now, group_id)
    return GroupSweep(stops, stopped, await groups_open(conn))


async def _view(conn: Connection, row: Sequence) -> GroupView:
    group_id = row[0]
    details = await conn.fetch(
        "SELECT r.job_id, j.reason, (SELECT supervisor_id FROM runs u WHERE u.job_id = j.id"
        " AND u.attempt = j.attempts) FROM group_roles r JOIN jobs j ON j.id = r.job_id"
        " WHERE r.group_id = $1",
        group_id,
    )
    devices = await conn.fetch(
        "SELECT d.job_id, d.device_id FROM run_devices d JOIN group_roles r"
        " ON r.job_id = d.job_id JOIN jobs j ON j.id = d.job_id AND j.attempts = d.attempt"
        ' WHERE r.group_id = $1 ORDER BY d.pos, d.device_id COLLATE "C"',
        group_id,
    )
    return records.group_view(row, await _role_states(conn, group_id), details, devices)


async def get_group(conn: Connection, group_id: str) -> GroupView | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM job_groups WHERE id = $1", group_id)
    return None if row is None else await _view(conn, row)


async def list_groups(conn: Connection, limit: int) -> list[GroupView]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM job_groups ORDER BY created_at DESC, id LIMIT $1",
        limit,
    )
    return [await _view(conn, row) for row in rows]
