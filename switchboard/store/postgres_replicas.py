"""Several switchboard replicas on one PostgreSQL database: the leader lease, the
replicas' liveness, the fences on their writes, and the commands one replica leaves for
another (docs/deployment.md, "Several replicas"). The decisions are switchboard.lease's;
every function runs inside the caller's transaction. Times of the lease and of the
replicas' liveness are the database's clock, so replicas' clocks need not agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.messages import StopJob
from switchboard import lease
from switchboard.store.fencing import CHANNEL, SessionSuperseded, StaleTerm
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
        for supervisor_id in sorted({s for s, _ in commands}):
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, supervisor_id)


async def commands_waiting(conn: Connection, supervisor_ids: Sequence[str]) -> bool:
    """Whether any command waits for these supervisors."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM supervisor_commands"
            " WHERE supervisor_id = ANY($1::text[]))",
            list(supervisor_ids),
        )
    )


async def take_commands(
    conn: Connection, supervisor_ids: Sequence[str]
) -> list[tuple[str, StopJob]]:
    """The commands waiting for these supervisors, oldest first, taken (deleted)."""
    rows = await conn.fetch(
        "DELETE FROM supervisor_commands WHERE seq IN (SELECT seq FROM supervisor_commands"
        " WHERE supervisor_id = ANY($1::text[]) FOR UPDATE SKIP LOCKED)"
        " RETURNING seq, supervisor_id, job_id, attempt, reason",
        list(supervisor_ids),
    )
    return [
        (r[1], StopJob(job_id=r[2], attempt=r[3], reason=r[4]))
        for r in sorted(rows, key=lambda r: r[0])
    ]
