"""Reservations of the lab's devices in the SQLite store (docs/lab.md): waiting -> held ->
released or expired.

Every function takes the open connection and runs inside the caller's transaction. Which
waiting reservations get which devices is decided by switchboard.scheduler
(grant_reservations: all of them or none); this module reads the facts and writes the
answers.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Set as AbstractSet

import msgspec

from protocol.spec import Selector
from switchboard import scheduler
from switchboard.models import ReservationEnded as Ended
from switchboard.models import ReservationSweep as Sweep
from switchboard.models import ReservationView
from switchboard.store import records, sqlite_devices
from switchboard.store.sqlite_jobs import cancel_job

log = logging.getLogger("switchboard.store")

_COLUMNS = records.RESERVATION_COLUMNS

#: The states of a reservation that has not ended.
OPEN = ("waiting", "held")


_selector = msgspec.json.Decoder(Selector)


def _view(conn: sqlite3.Connection, row: tuple) -> ReservationView:
    devices = conn.execute(
        "SELECT device_id FROM reservation_devices WHERE reservation_id = ? ORDER BY device_id",
        (row[0],),
    )
    return records.reservation_view(row, devices)


def create(
    conn: sqlite3.Connection,
    reservation_id: str,
    wanted: scheduler.ReservationWanted,
    duration_s: float,
    owner: str | None,
    actor: str,
    ttl_s: float,
    now: float,
) -> ReservationView:
    """A new waiting reservation, expiring `ttl_s` from now unless refreshed."""
    conn.execute(
        f"INSERT INTO reservations ({_COLUMNS}) VALUES"
        " (?, 'waiting', ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL, '')",
        (
            reservation_id,
            actor,
            owner,
            wanted.count,
            wanted.class_,
            msgspec.json.encode(wanted.selector).decode(),
            wanted.priority,
            duration_s,
            now,
            now,
            now + ttl_s,
        ),
    )
    found = get(conn, reservation_id)
    assert found is not None
    return found


def get(conn: sqlite3.Connection, reservation_id: str) -> ReservationView | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM reservations WHERE id = ?", (reservation_id,)
    ).fetchone()
    return None if row is None else _view(conn, row)


def list_open(
    conn: sqlite3.Connection, owner: str | None = None, limit: int = 1000
) -> list[ReservationView]:
    """The reservations not ended (of one token), oldest first."""
    where, args = ("AND owner = ?", [owner]) if owner is not None else ("", [])
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM reservations WHERE state IN ('waiting', 'held') {where}"
        " ORDER BY created_at, id LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [_view(conn, row) for row in rows]


def refresh(
    conn: sqlite3.Connection, reservation_id: str, ttl_s: float, now: float
) -> ReservationView | None:
    """Its client is still there: a waiting reservation expires `ttl_s` from now (a held
    one keeps its lease's end). None if there is no such reservation."""
    conn.execute(
        "UPDATE reservations SET refreshed_at = ?,"
        " expires_at = CASE WHEN state = 'waiting' THEN ? ELSE expires_at END"
        " WHERE id = ? AND state IN ('waiting', 'held')",
        (now, now + ttl_s, reservation_id),
    )
    return get(conn, reservation_id)


def extend(
    conn: sqlite3.Connection, reservation_id: str, by_s: float, max_s: float, now: float
) -> ReservationView | str | None:
    """Lengthen the lease by `by_s` (a waiting one: the lease it will get), never past
    `max_s` from when it was granted; why not (a string) if it would pass it or has
    ended, None if there is no such reservation."""
    found = get(conn, reservation_id)
    if found is None:
        return None
    if found.state not in OPEN:
        return f"reservation {reservation_id} has {found.state}: it can't be extended"
    if found.state == "waiting":
        length = found.duration_s + by_s
        if length > max_s:
            return f"a lease lasts at most {max_s:g} s: {length:g} s asked for"
        conn.execute(
            "UPDATE reservations SET duration_s = ? WHERE id = ?", (length, reservation_id)
        )
    else:
        assert found.granted_at is not None
        end = found.expires_at + by_s
        if end - found.granted_at > max_s:
            return (
                f"a lease lasts at most {max_s:g} s from its grant: this one may be extended"
                f" by at most {max(0.0, found.granted_at + max_s - found.expires_at):g} s"
            )
        conn.execute("UPDATE reservations SET expires_at = ? WHERE id = ?", (end, reservation_id))
    return get(conn, reservation_id)


def _end(conn: sqlite3.Connection, reservation_id: str, state: str, why: str, now: float) -> None:
    """End it: its devices are free again; queued jobs naming it could never run, so they
    are canceled (runs under way go on)."""
    conn.execute(
        "UPDATE reservations SET state = ?, ended_at = ?, end_reason = ? WHERE id = ?",
        (state, now, why, reservation_id),
    )
    waiting = conn.execute(
        "SELECT id FROM jobs WHERE reservation = ? AND phase = 'queued'", (reservation_id,)
    ).fetchall()
    for (job_id,) in waiting:
        _cancel(conn, job_id, reservation_id, state)


def _cancel(conn: sqlite3.Connection, job_id: str, reservation_id: str, state: str) -> None:
    cancel_job(conn, job_id, "switchboard", f"its reservation {reservation_id} has {state}")


def release(
    conn: sqlite3.Connection, reservation_id: str, why: str, now: float
) -> ReservationView | None:
    """Release it now (nothing happens to one already ended); None if unknown."""
    row = conn.execute("SELECT state FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
    if row is None:
        return None
    if row[0] in OPEN:
        _end(conn, reservation_id, "released", why, now)
    return get(conn, reservation_id)


_EXPIRED_WAITING = (
    "SELECT id, 'expired', 'not refreshed by its client' FROM reservations"
    " WHERE state = 'waiting' AND expires_at <= ? ORDER BY expires_at LIMIT ?"
)
_EXPIRED_LEASES = (
    "SELECT id, 'expired', 'its lease ended' FROM reservations"
    " WHERE state = 'held' AND expires_at <= ? ORDER BY expires_at LIMIT ?"
)
_REVOKED = (
    "SELECT r.id, 'released', 'its token was revoked' FROM reservations r"
    " JOIN tokens t ON t.id = r.owner"
    " WHERE r.state IN ('waiting', 'held') AND t.revoked_at IS NOT NULL LIMIT ?"
)
#: Jobs queued again (a restart) after the reservation they name ended: they could never run.
_ORPHANS = (
    "SELECT j.id, r.id, r.state FROM jobs j INDEXED BY jobs_queued_by_reservation"
    " JOIN reservations r ON r.id = j.reservation"
    " WHERE j.reservation IS NOT NULL AND j.phase = 'queued'"
    " AND r.state IN ('released', 'expired') LIMIT ?"
)
#: Waiting ones still refreshed (one past its TTL is never granted, even when a limit
#: has left it for the next pass to expire).
_WAITING = (
    "SELECT id, count, class, selector, priority, created_at FROM reservations"
    " WHERE state = 'waiting' AND expires_at > ? ORDER BY priority DESC, created_at LIMIT ?"
)


def _grants(
    conn: sqlite3.Connection, now: float, limit: int, checked: AbstractSet[str]
) -> tuple[list[tuple[str, list[str]]], dict[str, float]]:
    rows = conn.execute(_WAITING, (now, limit)).fetchall()
    if not rows:
        return [], {}
    waiting = [
        scheduler.ReservationWanted(i, n, c, _selector.decode(s), p, at)
        for i, n, c, s, p, at in rows
    ]
    devices = sqlite_devices.lab_devices(conn, checked=checked)
    return scheduler.grant_reservations(waiting, devices), {w.id: w.created_at for w in waiting}


def sweep_due(
    conn: sqlite3.Connection, now: float, checked: AbstractSet[str] = frozenset()
) -> bool:
    """Some reservation is to be ended or granted now (a read: an idle lab writes
    nothing)."""
    for sql, args in (
        (_EXPIRED_WAITING, (now, 1)),
        (_EXPIRED_LEASES, (now, 1)),
        (_REVOKED, (1,)),
        (_ORPHANS, (1,)),
    ):
        if conn.execute(sql, args).fetchone() is not None:
            return True
    return bool(_grants(conn, now, 1000, checked)[0])


def sweep(
    conn: sqlite3.Connection, now: float, limit: int, checked: AbstractSet[str] = frozenset()
) -> Sweep:
    """One pass, at most `limit` reservations of each kind: expire the waiting ones not
    refreshed in time and the held ones whose lease has ended, release those whose token
    was revoked, cancel the jobs queued again (a restart) naming one that has ended, then
    grant the waiting ones that may have all their devices now
    (scheduler.grant_reservations), in that order, so devices freed are granted at once."""
    ended: list[Ended] = []
    more = False
    kinds = (
        (_EXPIRED_WAITING, (now, limit)),
        (_EXPIRED_LEASES, (now, limit)),
        (_REVOKED, (limit,)),
    )
    for sql, args in kinds:
        rows = conn.execute(sql, args).fetchall()
        more = more or len(rows) >= limit
        for reservation_id, state, why in rows:
            _end(conn, reservation_id, state, why, now)
            ended.append(Ended(reservation_id, state, why))
    orphans = conn.execute(_ORPHANS, (limit,)).fetchall()
    more = more or len(orphans) >= limit
    for job_id, reservation_id, state in orphans:
        _cancel(conn, job_id, reservation_id, state)
    grants, created = _grants(conn, now, limit, checked)
    granted: list[tuple[str, float]] = []
    for reservation_id, chosen in grants:
        conn.execute(
            "UPDATE reservations SET state = 'held', granted_at = ?,"
            " expires_at = ? + duration_s WHERE id = ?",
            (now, now, reservation_id),
        )
        conn.executemany(
            "INSERT INTO reservation_devices (reservation_id, device_id) VALUES (?, ?)",
            [(reservation_id, device_id) for device_id in chosen],
        )
        granted.append((reservation_id, now - created[reservation_id]))
    return Sweep(ended, granted, more)


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """state -> how many reservations (for the metrics)."""
    return dict(conn.execute("SELECT state, count(*) FROM reservations GROUP BY state").fetchall())


def owner_of(conn: sqlite3.Connection, reservation_id: str) -> tuple[str, str | None] | None:
    """(state, owner token) of a reservation, or None."""
    row = conn.execute(
        "SELECT state, owner FROM reservations WHERE id = ?", (reservation_id,)
    ).fetchone()
    return None if row is None else (row[0], row[1])
