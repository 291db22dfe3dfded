"""API tokens and supervisors' host credentials in the SQLite store.

Every function takes the open connection and runs inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3

from switchboard.models import Enrolment, TokenView
from switchboard.store.errors import ConnectRefused


def add_token(
    conn: sqlite3.Connection,
    token_id: str,
    role: str,
    name: str,
    digest: bytes,
    supervisor_id: str | None,
    replace_bound: bool,
    now: float,
) -> None:
    if replace_bound and supervisor_id is not None:
        conn.execute(
            "UPDATE tokens SET revoked_at = ? WHERE supervisor_id = ? AND revoked_at IS NULL",
            (now, supervisor_id),
        )
    conn.execute(
        "INSERT INTO tokens (id, role, name, hash, created_at, supervisor_id)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (token_id, role, name, digest, now, supervisor_id),
    )


def find_token(conn: sqlite3.Connection, digest: bytes) -> TokenView | None:
    row = conn.execute(
        "SELECT id, role, name, created_at, 0, supervisor_id FROM tokens"
        " WHERE hash = ? AND revoked_at IS NULL",
        (digest,),
    ).fetchone()
    return TokenView(*row) if row else None


def list_tokens(conn: sqlite3.Connection) -> list[TokenView]:
    rows = conn.execute(
        "SELECT id, role, name, created_at, revoked_at IS NOT NULL, supervisor_id"
        " FROM tokens ORDER BY created_at, id"
    ).fetchall()
    return [TokenView(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]


def revoke_token(conn: sqlite3.Connection, token_id: str, now: float) -> bool:
    if conn.execute("SELECT 1 FROM tokens WHERE id = ?", (token_id,)).fetchone() is None:
        return False
    conn.execute(
        "UPDATE tokens SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (now, token_id)
    )
    return True


def token_valid(conn: sqlite3.Connection, token_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM tokens WHERE id = ? AND revoked_at IS NULL", (token_id,)
    ).fetchone()
    return row is not None


def enrol(conn: sqlite3.Connection, supervisor_id: str, enrolment: Enrolment, now: float) -> None:
    """Store `enrolment` as the supervisor's credential: a supervisor token bound to it.
    Only an id with no host credential (no valid token bound to it) may be enrolled."""
    held = conn.execute(
        "SELECT 1 FROM tokens WHERE supervisor_id = ? AND revoked_at IS NULL LIMIT 1",
        (supervisor_id,),
    ).fetchone()
    if held is not None:
        raise ConnectRefused("enrolled")
    if conn.execute("SELECT 1 FROM tokens WHERE hash = ?", (enrolment.digest,)).fetchone():
        raise ConnectRefused("credential_taken")
    conn.execute(
        "INSERT INTO tokens (id, role, name, hash, created_at, supervisor_id)"
        " VALUES (?, 'supervisor', ?, ?, ?, ?)",
        (enrolment.token_id, enrolment.name, enrolment.digest, now, supervisor_id),
    )


def unenroll(conn: sqlite3.Connection, supervisor_id: str, now: float) -> list[str] | None:
    """Revoke the supervisor's host credentials: their ids, or None if the id is neither a
    known supervisor nor bound to a token."""
    bound = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM tokens WHERE supervisor_id = ? AND revoked_at IS NULL",
            (supervisor_id,),
        )
    ]
    known = conn.execute(
        "SELECT 1 FROM supervisors WHERE id = ?"
        " UNION ALL SELECT 1 FROM tokens WHERE supervisor_id = ? LIMIT 1",
        (supervisor_id, supervisor_id),
    ).fetchone()
    if known is None:
        return None
    conn.execute(
        "UPDATE tokens SET revoked_at = ? WHERE supervisor_id = ? AND revoked_at IS NULL",
        (now, supervisor_id),
    )
    return bound
