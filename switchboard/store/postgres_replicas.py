"""Several switchboard replicas on one PostgreSQL database: the leader lease, the
replicas' liveness, the fences on their writes, and the commands one replica leaves for
another (stop, start, power, and the answer to a power request written back;
docs/deployment.md, "Several replicas"). The decisions are switchboard.lease's; every
function runs inside the caller's transaction. Times of the lease and of the replicas'
liveness are the database's clock, so replicas' clocks need not agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.messages import StopJob
from switchboard import lease
from switchboard.models import SupervisorCommand
from switchboard.store.fencing import ANSWERED, CHANNEL, SessionSuperseded, StaleTerm
from switchboard.store.postgres_engine import Connection

_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"


async def claim_lease(
    conn: Connection, me: str, ttl_s: float
) -> tuple[lease.Claim, dict[str, int]]:
    """Renew this replica's liveness and claim the lease (switchboard.lease.claim); with
    it, the sessions this replica owns now (supervisor id -> session): a connection the
    store no longer gives it is over."""
    now = await conn.fetchval(_NOW)
    await conn.execute(
        "INSERT INTO switchboard_replicas (id, started_at, last_seen) VALUES ($1, $2, $2)"
        " ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
        me,
        now,
    )
    row = await conn.fetchrow(
        "SELECT holder, term, expires_at FROM switchboard_lease WHERE name = 'leader' FOR UPDATE"
    )
    current = lease.LeaseRow(*row) if row is not None else None
    decision = lease.claim(current, me, now, ttl_s)
    if decision.row is not None:
        await conn.execute(
            "INSERT INTO switchboard_lease (name, holder, term, expires_at)"
            " VALUES ('leader', $1, $2, $3) ON CONFLICT (name) DO UPDATE"
            " SET holder = excluded.holder, term = excluded.term, expires_at = excluded.expires_at",
            decision.row.holder,
            decision.row.term,
            decision.row.expires_at,
        )
    owned = await conn.fetch(
        "SELECT id, session FROM supervisors WHERE replica = $1 AND connected = 1", me
    )
    return decision, {r[0]: r[1] for r in owned}


async def leave(conn: Connection, me: str) -> None:
    """A replica stopping: its lease (if it holds it) expires now, and it is no longer
    counted alive (the leader reaps what it still owns at once)."""
    now = await conn.fetchval(_NOW)
    row = await conn.fetchrow(
        "SELECT holder, term, expires_at FROM switchboard_lease WHERE name = 'leader' FOR UPDATE"
    )
    released = lease.release(lease.LeaseRow(*row) if row else None, me, now)
    if released is not None:
        await conn.execute(
            "UPDATE switchboard_lease SET expires_at = $1 WHERE name = 'leader'",
            released.expires_at,
        )
    await conn.execute("DELETE FROM switchboard_replicas WHERE id = $1", me)


async def register(conn: Connection, me: str) -> None:
    """A replica starting: counted alive from now (before it takes any connection)."""
    now = await conn.fetchval(_NOW)
    await conn.execute(
        "INSERT INTO switchboard_replicas (id, started_at, last_seen) VALUES ($1, $2, $2)"
        " ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
        me,
        now,
    )


async def last_seen_ago(conn: Connection, replica: str) -> float | None:
    """Seconds since replica `replica` last renewed its liveness (None: not recorded, or
    it left)."""
    ago = await conn.fetchval(
        "SELECT extract(epoch FROM clock_timestamp())::float8 - last_seen"
        " FROM switchboard_replicas WHERE id = $1",
        replica,
    )
    return None if ago is None else float(ago)


async def reap(conn: Connection, dead_after_s: float, wall_now: float) -> list[str]:
    """End the sessions of replicas silent past `dead_after_s` (or gone, or from before
    replicas were recorded): their supervisors are disconnected, and their grace starts
    now. The ids of the supervisors reaped."""
    now = await conn.fetchval(_NOW)
    await conn.execute(
        "DELETE FROM switchboard_replicas WHERE last_seen < $1", now - 10 * dead_after_s
    )
    rows = await conn.fetch(
        "UPDATE supervisors SET connected = 0, last_seen = $1 WHERE connected = 1 AND"
        " (replica IS NULL OR replica NOT IN"
        "  (SELECT id FROM switchboard_replicas WHERE last_seen >= $2))"
        " RETURNING id, session",
        wall_now,
        now - dead_after_s,
    )
    for supervisor_id, session in rows:
        await conn.execute(
            "UPDATE supervisor_sessions SET disconnected_at = $1, reason = $2"
            " WHERE supervisor_id = $3 AND session = $4 AND disconnected_at IS NULL",
            wall_now,
            "its switchboard replica stopped answering",
            supervisor_id,
            session,
        )
    return sorted(r[0] for r in rows)


async def fence(conn: Connection, term: int | None, session: tuple[str, int] | None) -> None:
    """Refuse (raising) a write of singleton work whose `term` is no longer the lease's,
    or of a connection whose `session` is no longer its supervisor's connected one. The
    lease row is share-locked until the write commits (a takeover waits for it), the
    supervisor's row locked as every write for it locks it first."""
    if term is not None:
        held = await conn.fetchval(
            "SELECT 1 FROM switchboard_lease WHERE name = 'leader' AND term = $1 FOR SHARE", term
        )
        if held is None:
            raise StaleTerm(f"lease term {term} has ended: another replica leads")
    if session is not None:
        row = await conn.fetchrow(
            "SELECT session, connected FROM supervisors WHERE id = $1 FOR UPDATE", session[0]
        )
        check_session(session, row)


def check_session(session: tuple[str, int], row: Any) -> None:
    """Refuse (raising) a connection's write unless its supervisor's locked row (`row`:
    its `session` and `connected` columns, None if it is gone) is still that session's."""
    supervisor_id, number = session
    if row is None or row["session"] != number or row["connected"] != 1:
        raise SessionSuperseded(
            f"session {number} of supervisor {supervisor_id} is over"
            " (it connected again, or its replica was taken for dead)"
        )


async def add_commands(
    conn: Connection, commands: Sequence[tuple[str, StopJob]], now: float, notify: bool
) -> None:
    """Leave StopJobs for the replicas holding their supervisors' sockets; with `notify`,
    a hint (the supervisor's id) on CHANNEL, sent when this commits (one per id)."""
    for supervisor_id, stop in commands:
        await conn.execute(
            "INSERT INTO supervisor_commands (supervisor_id, job_id, attempt, reason, created_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            supervisor_id,
            stop.job_id,
            stop.attempt,
            stop.reason,
            now,
        )
    if notify:
        await _hint(conn, {s for s, _ in commands})


async def add_starts(
    conn: Connection, runs: Sequence[tuple[str, str, int]], now: float, notify: bool
) -> None:
    """Have the replicas holding these supervisors' sockets send the StartJobs of the
    stored runs (supervisor id, job id, attempt), in the caller's transaction (the one
    creating the runs)."""
    await conn.executemany(
        "INSERT INTO supervisor_commands (supervisor_id, kind, job_id, attempt, reason,"
        " created_at) VALUES ($1, 'start', $2, $3, '', $4)",
        [(supervisor_id, job_id, attempt, now) for supervisor_id, job_id, attempt in runs],
    )
    if notify:
        await _hint(conn, {s for s, _, _ in runs})


#: A power request whose asker has not taken its answer by then is dropped (the asker
#: was stopped while it waited: nobody reads it).
_POWER_KEPT_S = 3600.0


async def ask_power(
    conn: Connection, supervisor_id: str, device_id: str, action: str, now: float, notify: bool
) -> int | None:
    """Leave a power request for the replica holding the supervisor's socket: its seq, to
    wait for the answer under; None if the supervisor is not connected to any replica."""
    connected = await conn.fetchval(
        "SELECT connected = 1 AND replica IS NOT NULL FROM supervisors WHERE id = $1",
        supervisor_id,
    )
    if not connected:
        return None
    await conn.execute(
        "DELETE FROM supervisor_commands WHERE kind = 'power' AND created_at < $1",
        now - _POWER_KEPT_S,
    )
    seq: int = await conn.fetchval(
        "INSERT INTO supervisor_commands (supervisor_id, kind, job_id, attempt, reason,"
        " device_id, action, created_at) VALUES ($1, 'power', '', 0, '', $2, $3, $4)"
        " RETURNING seq",
        supervisor_id,
        device_id,
        action,
        now,
    )
    if notify:
        await _hint(conn, {supervisor_id})
    return seq


async def answer_power(conn: Connection, seq: int, answer: str, notify: bool) -> bool:
    """Write the answer to power request `seq` (JSON) for the replica that asked; False if
    it no longer waits for it (it gave up)."""
    done = await conn.fetchval(
        "UPDATE supervisor_commands SET answer = $1 WHERE seq = $2 AND kind = 'power'"
        " RETURNING seq",
        answer,
        seq,
    )
    if done is not None and notify:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{ANSWERED}{seq}")
    return done is not None


async def power_answer(conn: Connection, seq: int) -> tuple[bool, str | None]:
    """Whether power request `seq` is still there, and its answer if written."""
    row = await conn.fetchrow("SELECT answer FROM supervisor_commands WHERE seq = $1", seq)
    return (False, None) if row is None else (True, row[0])


async def forget_command(conn: Connection, seq: int) -> None:
    await conn.execute("DELETE FROM supervisor_commands WHERE seq = $1", seq)


async def _hint(conn: Connection, supervisor_ids: set[str]) -> None:
    """A hint per supervisor on CHANNEL, sent when the transaction commits."""
    for supervisor_id in sorted(supervisor_ids):
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, supervisor_id)


async def commands_waiting(conn: Connection, supervisor_ids: Sequence[str]) -> bool:
    """Whether any command not yet taken waits for these supervisors."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM supervisor_commands"
            " WHERE supervisor_id = ANY($1::text[]) AND taken_at IS NULL)",
            list(supervisor_ids),
        )
    )


async def take_commands(
    conn: Connection, supervisor_ids: Sequence[str], now: float
) -> list[SupervisorCommand]:
    """The commands waiting for these supervisors, oldest first, taken: StopJobs and
    StartJobs deleted, power requests marked taken (their answer is written on them)."""
    ids = list(supervisor_ids)
    rows = await conn.fetch(
        "DELETE FROM supervisor_commands WHERE seq IN (SELECT seq FROM supervisor_commands"
        " WHERE supervisor_id = ANY($1::text[]) AND kind != 'power' AND taken_at IS NULL"
        " FOR UPDATE SKIP LOCKED)"
        " RETURNING seq, supervisor_id, kind, job_id, attempt, reason, device_id, action",
        ids,
    )
    rows += await conn.fetch(
        "UPDATE supervisor_commands SET taken_at = $2 WHERE seq IN (SELECT seq FROM"
        " supervisor_commands WHERE supervisor_id = ANY($1::text[]) AND kind = 'power'"
        " AND taken_at IS NULL FOR UPDATE SKIP LOCKED)"
        " RETURNING seq, supervisor_id, kind, job_id, attempt, reason, device_id, action",
        ids,
        now,
    )
    return [
        SupervisorCommand(
            seq=r[0],
            supervisor_id=r[1],
            kind=r[2],
            job_id=r[3],
            attempt=r[4],
            reason=r[5],
            device_id=r[6] or "",
            action=r[7] or "",
        )
        for r in sorted(rows, key=lambda r: r[0])
    ]
