"""Job groups in the SQLite store (docs/lab.md, "Job groups"): a group's jobs are queued
held (`jobs.gang`: the dispatcher's queue leaves them out) until every role is placed in
one transaction (`assign_group`, all or none); the sweep stops a group whose essential
role ended without succeeding. What to place and what to stop is decided by
switchboard.gangs; this module reads its facts and writes its answers.

Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import logging
import sqlite3
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
from switchboard.store.schema import TERMINAL_PHASES, TERMINAL_SQL
from switchboard.store.sqlite_jobs import NewJob, cancel_job, insert_jobs
from switchboard.store.sqlite_placement import assign_run

log = logging.getLogger("switchboard.store")

_COLUMNS = records.GROUP_COLUMNS


class NotAllPlaced(Exception):
    """A role of a group could not be placed after all: the transaction rolls back."""


def create_group(
    conn: sqlite3.Connection,
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
    """Queue the group's jobs, held for its placement (all or none: the caller's
    transaction rolls back on QueueFull or ArtifactMissing)."""
    made = insert_jobs(
        conn,
        [job for _, _, job in roles],
        actor,
        max_queued,
        owner=owner,
        max_per_owner=max_per_owner,
    )
    conn.execute(
        "INSERT INTO job_groups (id, name, owner, actor, priority, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (group_id, name, owner, actor, priority, now),
    )
    for pos, (role, essential, job) in enumerate(roles):
        conn.execute(
            "INSERT INTO group_roles (group_id, role, pos, job_id, essential)"
            " VALUES (?, ?, ?, ?, ?)",
            (group_id, role, pos, job.id, int(essential)),
        )
        conn.execute(
            "UPDATE jobs SET gang = ? WHERE id = ? AND phase = 'queued'", (group_id, job.id)
        )
    return made


def waiting_groups(conn: sqlite3.Connection, limit: int) -> list[tuple[str, list[gangs.RoleNeed]]]:
    """The groups waiting to be placed, by priority (higher first) then age: each with
    its roles still queued (a role canceled meanwhile is left out)."""
    groups = conn.execute(
        "SELECT g.id FROM job_groups g WHERE g.placed_at IS NULL AND g.ended_at IS NULL"
        " AND g.stop_reason IS NULL"
        " AND EXISTS (SELECT 1 FROM jobs j WHERE j.gang = g.id AND j.phase = 'queued')"
        " ORDER BY g.priority DESC, g.created_at, g.id LIMIT ?",
        (limit,),
    ).fetchall()
    found = []
    for (group_id,) in groups:
        rows = conn.execute(
            "SELECT r.role, r.job_id, j.spec, r.essential FROM group_roles r"
            " JOIN jobs j ON j.id = r.job_id"
            " WHERE r.group_id = ? AND j.gang = ? AND j.phase = 'queued'"
            " AND j.cancel_requested = 0 ORDER BY r.pos",
            (group_id, group_id),
        ).fetchall()
        needs = [
            gangs.RoleNeed(role, job_id, records.decode_spec(spec), bool(essential))
            for role, job_id, spec, essential in rows
        ]
        found.append((group_id, needs))
    return found


def assign_group(
    conn: sqlite3.Connection,
    group_id: str,
    pairs: Sequence[tuple[str, str]],
    now: float,
    keyring: Keyring,
    checked: AbstractSet[str] = frozenset(),
) -> list[Assignment]:
    """A run for every role (job id, supervisor id), with its devices granted, or none:
    NotAllPlaced (the caller rolls back) if one can't be had now. The group's jobs are
    then no longer held."""
    made = []
    for job_id, supervisor_id in pairs:
        run = assign_run(conn, job_id, supervisor_id, now, keyring, checked)
        if run is None:
            raise NotAllPlaced(job_id)
        made.append(run)
    conn.execute("UPDATE jobs SET gang = NULL WHERE gang = ?", (group_id,))
    conn.execute("UPDATE job_groups SET placed_at = ? WHERE id = ?", (now, group_id))
    return made


def _role_states(conn: sqlite3.Connection, group_id: str) -> list[gangs.RoleState]:
    rows = conn.execute(
        "SELECT r.role, r.job_id, j.phase, r.essential, j.gang FROM group_roles r"
        " LEFT JOIN jobs j ON j.id = r.job_id WHERE r.group_id = ? ORDER BY r.pos",
        (group_id,),
    )
    return [
        gangs.RoleState(role, job_id, Phase(phase) if phase else None, bool(ess), gang is not None)
        for role, job_id, phase, ess, gang in rows
    ]


#: Open groups with a role whose job has ended (or is gone): the sweep looks at these.
_TO_SWEEP = (
    "SELECT DISTINCT g.id, g.stop_reason FROM job_groups g"
    " JOIN group_roles r ON r.group_id = g.id LEFT JOIN jobs j ON j.id = r.job_id"
    f" WHERE g.ended_at IS NULL AND (j.id IS NULL OR j.phase IN ({TERMINAL_SQL}))"
    " ORDER BY g.id LIMIT ?"
)


def groups_open(conn: sqlite3.Connection) -> bool:
    found = conn.execute("SELECT 1 FROM job_groups WHERE ended_at IS NULL LIMIT 1").fetchone()
    return found is not None


def groups_to_sweep(conn: sqlite3.Connection) -> bool:
    """Some open group has a role that ended (a cheap read: sweep writes only if so)."""
    return conn.execute(_TO_SWEEP, (*TERMINAL_PHASES, 1)).fetchone() is not None


def sweep(conn: sqlite3.Connection, now: float, limit: int) -> GroupSweep:
    """Stop the open groups an essential role of which has ended without succeeding
    (gangs.to_stop: the others are canceled, naming the role) and close those whose
    roles have all ended."""
    stops: list[RunOnSupervisor] = []
    stopped: list[tuple[str, str]] = []
    for group_id, stop_reason in conn.execute(_TO_SWEEP, (*TERMINAL_PHASES, limit)).fetchall():
        roles = _role_states(conn, group_id)
        if stop_reason is None and (stop := gangs.to_stop(roles, group_id)) is not None:
            for job_id in stop.cancel:
                result = cancel_job(conn, job_id, f"group {group_id}", stop.reason)
                if result and result.supervisor_id is not None and result.attempt is not None:
                    stops.append(RunOnSupervisor(job_id, result.attempt, result.supervisor_id))
            conn.execute(
                "UPDATE job_groups SET stop_reason = ? WHERE id = ?", (stop.reason, group_id)
            )
            conn.execute("UPDATE jobs SET gang = NULL WHERE gang = ?", (group_id,))
            stopped.append((group_id, stop.reason))
            log.info("group %s stopped: %s", group_id, stop.reason)
            roles = _role_states(conn, group_id)
        if all(r.phase is None or r.phase.value in TERMINAL_PHASES for r in roles):
            conn.execute("UPDATE job_groups SET ended_at = ? WHERE id = ?", (now, group_id))
    return GroupSweep(stops, stopped, groups_open(conn))


def _view(conn: sqlite3.Connection, row: tuple) -> GroupView:
    group_id = row[0]
    details = conn.execute(
        "SELECT r.job_id, j.reason, (SELECT supervisor_id FROM runs u WHERE u.job_id = j.id"
        " AND u.attempt = j.attempts) FROM group_roles r JOIN jobs j ON j.id = r.job_id"
        " WHERE r.group_id = ?",
        (group_id,),
    )
    devices = conn.execute(
        "SELECT d.job_id, d.device_id FROM run_devices d JOIN group_roles r"
        " ON r.job_id = d.job_id JOIN jobs j ON j.id = d.job_id AND j.attempts = d.attempt"
        " WHERE r.group_id = ? ORDER BY d.pos, d.device_id",
        (group_id,),
    )
    return records.group_view(row, _role_states(conn, group_id), details, devices)


def get_group(conn: sqlite3.Connection, group_id: str) -> GroupView | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM job_groups WHERE id = ?", (group_id,)).fetchone()
    return None if row is None else _view(conn, row)


def list_groups(conn: sqlite3.Connection, limit: int) -> list[GroupView]:
    """The newest groups first."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM job_groups ORDER BY created_at DESC, id LIMIT ?",
        (limit,),
    ).fetchall()
    return [_view(conn, row) for row in rows]
