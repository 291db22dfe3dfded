"""Supervisors and tokens in the PostgreSQL store (sqlite_supervisors.py's and
sqlite_tokens.py's SQL, translated): records, connections with their session
generation, drain and labels; API tokens and host credentials. Every function runs inside
the caller's transaction.
"""

from __future__ import annotations

import json

from protocol.messages import Hello
from protocol.versions import DEVICES_MINOR, minor_of, negotiate_version
from switchboard.models import Connected, ConnectionRecord, Enrolment, SupervisorView, TokenView
from switchboard.store import postgres_devices, records
from switchboard.store.errors import ConnectRefused
from switchboard.store.postgres_engine import Connection, affected
from switchboard.store.schema import ACTIVE_LITERALS

# --- tokens ---------------------------------------------------------------------------

_INSERT_TOKEN = (
    "INSERT INTO tokens (id, role, name, hash, created_at, supervisor_id)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)
_REVOKE_BOUND = "UPDATE tokens SET revoked_at = $1 WHERE supervisor_id = $2 AND revoked_at IS NULL"


async def add_token(
    conn: Connection,
    token_id: str,
    role: str,
    name: str,
    digest: bytes,
    supervisor_id: str | None,
    replace_bound: bool,
    now: float,
) -> None:
    if replace_bound and supervisor_id is not None:
        await conn.execute(_REVOKE_BOUND, now, supervisor_id)
    await conn.execute(_INSERT_TOKEN, token_id, role, name, digest, now, supervisor_id)


async def find_token(conn: Connection, digest: bytes) -> TokenView | None:
    row = await conn.fetchrow(
        "SELECT id, role, name, created_at, false, supervisor_id FROM tokens"
        " WHERE hash = $1 AND revoked_at IS NULL",
        digest,
    )
    return TokenView(*row) if row else None


async def list_tokens(conn: Connection) -> list[TokenView]:
    rows = await conn.fetch(
        "SELECT id, role, name, created_at, revoked_at IS NOT NULL, supervisor_id"
        ' FROM tokens ORDER BY created_at, id COLLATE "C"'
    )
    return [TokenView(*row) for row in rows]


async def revoke_token(conn: Connection, token_id: str, now: float) -> bool:
    return bool(
        affected(
            await conn.execute(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, $1) WHERE id = $2",
                now,
                token_id,
            )
        )
    )


async def _enrol(conn: Connection, supervisor_id: str, enrolment: Enrolment, now: float) -> None:
    """sqlite_tokens.enrol: only an id with no host credential may be enrolled."""
    held = await conn.fetchval(
        "SELECT 1 FROM tokens WHERE supervisor_id = $1 AND revoked_at IS NULL LIMIT 1",
        supervisor_id,
    )
    if held is not None:
        raise ConnectRefused("enrolled")
    if await conn.fetchval("SELECT 1 FROM tokens WHERE hash = $1", enrolment.digest):
        raise ConnectRefused("credential_taken")
    await conn.execute(
        _INSERT_TOKEN,
        enrolment.token_id,
        "supervisor",
        enrolment.name,
        enrolment.digest,
        now,
        supervisor_id,
    )


async def unenroll(conn: Connection, supervisor_id: str, now: float) -> list[str] | None:
    known = await conn.fetchval(
        "SELECT 1 FROM supervisors WHERE id = $1"
        " UNION ALL SELECT 1 FROM tokens WHERE supervisor_id = $1 LIMIT 1",
        supervisor_id,
    )
    if known is None:
        return None
    rows = await conn.fetch(_REVOKE_BOUND + " RETURNING id", now, supervisor_id)
    return [row[0] for row in rows]


# --- supervisors ----------------------------------------------------------------------


async def connected(
    conn: Connection,
    hello: Hello,
    token_id: str | None,
    enrolment: Enrolment | None,
    now: float,
    replica: str,
) -> Connected:
    """Record a (re)connect: a new session generation (the epoch every write for the
    connection checks), the connection's start, and `replica`, the switchboard process
    holding its socket. Commands left for the supervisor are dropped: the reconcile that
    follows settles what they said. The supervisor's row is locked first (created if
    new), as in every write for it."""
    await conn.execute(
        "INSERT INTO supervisors (id, name, first_seen) VALUES ($1, $2, $3)"
        " ON CONFLICT (id) DO NOTHING",
        hello.supervisor_id,
        hello.name,
        now,
    )
    await conn.execute("SELECT 1 FROM supervisors WHERE id = $1 FOR UPDATE", hello.supervisor_id)
    if token_id is not None and not await conn.fetchval(
        "SELECT 1 FROM tokens WHERE id = $1 AND revoked_at IS NULL", token_id
    ):
        raise ConnectRefused("token_revoked")
    if enrolment is not None:
        await _enrol(conn, hello.supervisor_id, enrolment, now)
    # What the handshake negotiated (the same function, the same answer).
    version = negotiate_version(hello.versions)
    row = await conn.fetchrow(
        "UPDATE supervisors SET name = $1, labels = $2, backends = $3, resources = $4,"
        " max_jobs = $5, software = $6, protocol = $7, session = session + 1, connected = 1,"
        " connected_at = $8, last_seen = $8, replica = $10 WHERE id = $9"
        " RETURNING session, last_seq",
        hello.name,
        json.dumps(hello.labels),
        json.dumps(hello.backends),
        json.dumps(hello.resources),
        hello.max_jobs,
        hello.software,
        version,
        now,
        hello.supervisor_id,
        replica,
    )
    assert row is not None  # the row was made above
    session, last_seq = row
    # Its reconcile settles the StopJobs and StartJobs left for it; a power request not
    # yet answered is still wanted: the replica it connected to takes it.
    await conn.execute(
        "DELETE FROM supervisor_commands WHERE supervisor_id = $1 AND kind != 'power'",
        hello.supervisor_id,
    )
    # A session another replica still holds open ends here: that replica's late
    # disconnect of it then changes nothing.
    await conn.execute(
        "UPDATE supervisor_sessions SET disconnected_at = $1, reason = $2"
        " WHERE supervisor_id = $3 AND session < $4 AND disconnected_at IS NULL",
        now,
        "replaced by a newer connection",
        hello.supervisor_id,
        session,
    )
    await conn.execute(
        "INSERT INTO supervisor_sessions (supervisor_id, session, connected_at)"
        " VALUES ($1, $2, $3) ON CONFLICT (supervisor_id, session) DO UPDATE"
        " SET connected_at = excluded.connected_at, disconnected_at = NULL, reason = NULL",
        hello.supervisor_id,
        session,
        now,
    )
    # A hello older than 1.4 declares no devices, and its supervisor can't be granted any.
    devices = hello.devices if minor_of(version) >= DEVICES_MINOR else []
    refused = await postgres_devices.record_inventory(conn, hello.supervisor_id, devices, now)
    return Connected(session, last_seq, tuple(refused))


async def disconnected(
    conn: Connection, supervisor_id: str, session: int, now: float, reason: str
) -> None:
    await conn.execute(
        "UPDATE supervisors SET connected = 0, last_seen = $1 WHERE id = $2 AND session = $3",
        now,
        supervisor_id,
        session,
    )
    await conn.execute(
        "UPDATE supervisor_sessions SET disconnected_at = $1, reason = $2"
        " WHERE supervisor_id = $3 AND session = $4 AND disconnected_at IS NULL",
        now,
        reason,
        supervisor_id,
        session,
    )


async def forget_connections(conn: Connection, now: float, replica: str) -> None:
    """Replica `replica` starts: none of the connections recorded as its own is (a
    replica id given again across a restart); their grace starts now. Other replicas'
    connections are theirs: those of a replica that died are reaped by the leader
    (postgres_replicas.reap)."""
    rows = await conn.fetch(
        "UPDATE supervisors SET connected = 0, last_seen = $1 WHERE connected = 1"
        " AND replica = $2 RETURNING id, session",
        now,
        replica,
    )
    for supervisor_id, session in rows:
        await conn.execute(
            "UPDATE supervisor_sessions SET disconnected_at = $1, reason = $2"
            " WHERE supervisor_id = $3 AND session = $4 AND disconnected_at IS NULL",
            now,
            "the switchboard restarted",
            supervisor_id,
            session,
        )


async def connection_records(
    conn: Connection, supervisor_id: str, limit: int
) -> list[ConnectionRecord]:
    rows = await conn.fetch(
        "SELECT session, connected_at, disconnected_at, reason FROM supervisor_sessions"
        " WHERE supervisor_id = $1 ORDER BY session DESC LIMIT $2",
        supervisor_id,
        limit,
    )
    return [ConnectionRecord(*row) for row in rows]


async def set_drained(conn: Connection, supervisor_id: str, drained: bool) -> bool:
    status = await conn.execute(
        "UPDATE supervisors SET drained = $1 WHERE id = $2", int(drained), supervisor_id
    )
    return affected(status) > 0


async def set_operator_labels(conn: Connection, supervisor_id: str, labels: dict) -> bool:
    status = await conn.execute(
        "UPDATE supervisors SET operator_labels = $1 WHERE id = $2",
        json.dumps(labels),
        supervisor_id,
    )
    return affected(status) > 0


async def running_counts(conn: Connection) -> dict[str, int]:
    rows = await conn.fetch(
        f"SELECT supervisor_id, count(*) FROM runs WHERE phase IN ({ACTIVE_LITERALS})"
        " GROUP BY supervisor_id"
    )
    return {r[0]: r[1] for r in rows}


async def load_supervisors(
    conn: Connection, only: str | None, counts: dict[str, int] | None = None
) -> list[SupervisorView]:
    if counts is None:
        counts = await running_counts(conn)
    sql = f"SELECT {records.SUPERVISOR_COLUMNS} FROM supervisors"
    rows = (
        await conn.fetch(sql + " WHERE id = $1", only)
        if only is not None
        else await conn.fetch(sql + ' ORDER BY id COLLATE "C"')
    )
    return [records.supervisor_view(r, counts) for r in rows]
