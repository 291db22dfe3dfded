"""Supervisors in the SQLite store: their records, their connections (the session
generation each connect gets, and the history of past connections), drain and labels.

Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import json
import sqlite3

from protocol.messages import Hello
from protocol.versions import DEVICES_MINOR, minor_of, negotiate_version
from switchboard.models import Connected, ConnectionRecord, Enrolment, SupervisorView
from switchboard.store import records, sqlite_devices
from switchboard.store.errors import ConnectRefused
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL
from switchboard.store.sqlite_tokens import enrol, token_valid


def connected(
    conn: sqlite3.Connection,
    hello: Hello,
    token_id: str | None,
    enrolment: Enrolment | None,
    now: float,
) -> Connected:
    """Record a (re)connect: a new session generation, the connection's start."""
    if token_id is not None and not token_valid(conn, token_id):
        raise ConnectRefused("token_revoked")
    if enrolment is not None:
        enrol(conn, hello.supervisor_id, enrolment, now)
    conn.execute(
        "INSERT INTO supervisors (id, name, first_seen) VALUES (?, ?, ?)"
        " ON CONFLICT (id) DO NOTHING",
        (hello.supervisor_id, hello.name, now),
    )
    # What the handshake negotiated (the same function, the same answer).
    version = negotiate_version(hello.versions)
    conn.execute(
        "UPDATE supervisors SET name = ?, labels = ?, backends = ?, resources = ?,"
        " max_jobs = ?, software = ?, protocol = ?, session = session + 1, connected = 1,"
        " connected_at = ?, last_seen = ? WHERE id = ?",
        (
            hello.name,
            json.dumps(hello.labels),
            json.dumps(hello.backends),
            json.dumps(hello.resources),
            hello.max_jobs,
            hello.software,
            version,
            now,
            now,
            hello.supervisor_id,
        ),
    )
    session, last_seq = conn.execute(
        "SELECT session, last_seq FROM supervisors WHERE id = ?", (hello.supervisor_id,)
    ).fetchone()
    conn.execute(
        "INSERT OR REPLACE INTO supervisor_sessions (supervisor_id, session, connected_at)"
        " VALUES (?, ?, ?)",
        (hello.supervisor_id, session, now),
    )
    # A hello older than 1.4 declares no devices, and its supervisor can't be granted any:
    # it has none in the inventory (it counts its resources as before).
    devices = hello.devices if minor_of(version) >= DEVICES_MINOR else []
    refused = sqlite_devices.record_inventory(conn, hello.supervisor_id, devices, now)
    return Connected(session, last_seq, tuple(refused))


def disconnected(
    conn: sqlite3.Connection, supervisor_id: str, session: int, now: float, reason: str
) -> None:
    conn.execute(
        "UPDATE supervisors SET connected = 0, last_seen = ? WHERE id = ? AND session = ?",
        (now, supervisor_id, session),
    )
    conn.execute(
        "UPDATE supervisor_sessions SET disconnected_at = ?, reason = ?"
        " WHERE supervisor_id = ? AND session = ? AND disconnected_at IS NULL",
        (now, reason, supervisor_id, session),
    )


def forget_connections(conn: sqlite3.Connection, now: float) -> None:
    """No supervisor is connected (the switchboard starts): every one's grace starts now."""
    conn.execute("UPDATE supervisors SET connected = 0, last_seen = ? WHERE connected = 1", (now,))
    conn.execute(
        "UPDATE supervisor_sessions SET disconnected_at = ?, reason = ?"
        " WHERE disconnected_at IS NULL",
        (now, "the switchboard restarted"),
    )


def connection_records(
    conn: sqlite3.Connection, supervisor_id: str, limit: int
) -> list[ConnectionRecord]:
    rows = conn.execute(
        "SELECT session, connected_at, disconnected_at, reason FROM supervisor_sessions"
        " WHERE supervisor_id = ? ORDER BY session DESC LIMIT ?",
        (supervisor_id, limit),
    )
    return [ConnectionRecord(*row) for row in rows]


def set_drained(conn: sqlite3.Connection, supervisor_id: str, drained: bool) -> bool:
    cursor = conn.execute(
        "UPDATE supervisors SET drained = ? WHERE id = ?", (int(drained), supervisor_id)
    )
    return cursor.rowcount > 0


def set_operator_labels(conn: sqlite3.Connection, supervisor_id: str, labels: dict) -> bool:
    cursor = conn.execute(
        "UPDATE supervisors SET operator_labels = ? WHERE id = ?",
        (json.dumps(labels), supervisor_id),
    )
    return cursor.rowcount > 0


def running_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Active runs per supervisor id."""
    rows = conn.execute(
        f"SELECT supervisor_id, count(*) FROM runs WHERE phase IN ({ACTIVE_SQL})"
        " GROUP BY supervisor_id",
        ACTIVE_PHASES,
    ).fetchall()
    return dict(rows)


def load_supervisors(
    conn: sqlite3.Connection, only: str | None, counts: dict[str, int] | None = None
) -> list[SupervisorView]:
    if counts is None:
        counts = running_counts(conn)
    sql = f"SELECT {records.SUPERVISOR_COLUMNS} FROM supervisors"
    rows = (
        conn.execute(sql + " WHERE id = ?", (only,))
        if only is not None
        else conn.execute(sql + " ORDER BY id")
    ).fetchall()
    return [records.supervisor_view(r, counts) for r in rows]
