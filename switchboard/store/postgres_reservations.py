"""Reservations of the lab's devices in the PostgreSQL store (sqlite_reservations.py's SQL,
translated): waiting -> held -> released or expired (docs/lab.md).

Every function takes a connection inside the caller's transaction. A sweep that grants
devices first locks the rows of every supervisor that declares devices, in id order (the
order placement takes them in), so a grant here and a run's grant there never hand out one
device twice, and never wait on each other in a circle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import msgspec

from protocol.spec import Selector
from switchboard import scheduler
from switchboard.models import ReservationEnded as Ended
from switchboard.models import ReservationSweep as Sweep
from switchboard.models import ReservationView
from switchboard.store import postgres_devices, records
from switchboard.store.postgres_engine import Connection
from switchboard.store.postgres_jobs import cancel_job
from switchboard.store.sqlite_reservations import OPEN

log = logging.getLogger("switchboard.store")

_COLUMNS = records.RESERVATION_COLUMNS


_selector = msgspec.json.Decoder(Selector)


async def _view(conn: Connection, row: Sequence) -> ReservationView:
    devices = await conn.fetch(
        "SELECT device_id FROM reservation_devices WHERE reservation_id = $1"
        ' ORDER BY device_id COLLATE "C"',
        row[0],
    )
    return records.reservation_view(row, devices)


async def create(
    conn: Connection,
    reservation_id: str,
    wanted: scheduler.ReservationWanted,
    duration_s: float,
    owner: str | None,
    actor: str,
    ttl_s: float,
    now: float,
) -> ReservationView:
    """A new waiting reservation, expiring `ttl_s` from now unless refreshed."""
    await conn.execute(
        f"INSERT INTO reservations ({_COLUMNS}) VALUES"
        " ($1, 'waiting', $2, $3, $4, $5, $6, $7, $8, $9, $9, NULL, $10, NULL, '')",
        reservation_id,
        actor,
        owner,
        wanted.count,
        wanted.class_,
        msgspec.json.encode(wanted.selector).decode(),
        wanted.priority,
        duration_s,
        now,
        now + ttl_s,
    )
    found = await get(conn, reservation_id)
    assert found is not None
    return found


async def get(conn: Connection, reservation_id: str) -> ReservationView | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM reservations WHERE id = $1", reservation_id)
    return None if row is None else await _view(conn, row)


async def list_open(
    conn: Connection, owner: str | None = None, limit: int = 1000
) -> list[ReservationView]:
    """The reservations not ended (of one token), oldest first."""
    if owner is None:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM reservations WHERE state IN ('waiting', 'held')"
            " ORDER BY created_at, id LIMIT $1",
            limit,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM reservations WHERE state IN ('waiting', 'held')"
            " AND owner = $1 ORDER BY created_at, id LIMIT $2",
            owner,
            limit,
        )
    return [await _view(conn, row) for row in rows]


async def refresh(
    conn: Connection, reservation_id: str, ttl_s: float, now: float
) -> ReservationView | None:
    """Its client is still there: a waiting reservation expires `ttl_s` from now."""
    await conn.execute(
        "UPDATE reservations SET refreshed_at = $1,"
        " expires_at = CASE WHEN state = 'waiting' THEN $2 ELSE expires_at END"
        " WHERE id = $3 AND state IN ('waiting', 'held')",
        now,
        now + ttl_s,
        reservation_id,
    )
    return await get(conn, reservation_id)


async def extend(
    conn: Connection, reservation_id: str, by_s: float, max_s: float, now: float
) -> ReservationView | str | None:
    """Lengthen the lease (sqlite_reservations.extend)."""
    await conn.execute("SELECT 1 FROM reservations WHERE id = $1 FOR UPDATE", reservation_id)
    found = await get(conn, reservation_id)
    if found is None:
        return None
    if found.state not in OPEN:
        return f"reservation {reservation_id} has {found.state}: it can't be extended"
    if found.state == "waiting":
        length = found.duration_s + by_s
        if length > max_s:
            return f"a lease lasts at most {max_s:g} s: {length:g} s asked for"
        await conn.execute(
            "UPDATE reservations SET duration_s = $1 WHERE id = $2", length, reservation_id
        )
    else:
        assert found.granted_at is not None
        end = found.expires_at + by_s
        if end - found.granted_at > max_s:
            return (
                f"a lease lasts at most {max_s:g} s from its grant: this one may be extended"
                f" by at most {max(0.0, found.granted_at + max_s - found.expires_at):g} s"
            )
        await conn.execute(
            "UPDATE reservations SET expires_at = $1 WHERE id = $2", end, reservation_id
        )
    return await get(conn, reservation_id)


async def _end(conn: Connection, reservation_id: str, state: str, why: str, now: float) -> None:
    """End it: its devices are free again; queued jobs naming it are canceled."""
    await conn.execute(
        "UPDATE reservations SET state = $1, ended_at = $2, end_reason = $3 WHERE id = $4",
        state,
        now,
        why,
        reservation_id,
    )
    waiting = await conn.fetch(
        "SELECT id FROM jobs WHERE reservation = $1 AND phase = 'queued'", reservation_id
    )
    for (job_id,) in waiting:
        await _cancel(conn, job_id, reservation_id, state)


async def _cancel(conn: Connection, job_id: str, reservation_id: str, state: str) -> None:
    await cancel_job(conn, job_id, "switchboard", f"its reservation {reservation_id} has {state}")


async def release(
    conn: Connection, reservation_id: str, why: str, now: float
) -> ReservationView | None:
    """Release it now (nothing happens to one already ended); None if unknown."""
    state = await conn.fetchval(
        "SELECT state FROM reservations WHERE id = $1 FOR UPDATE", reservation_id
    )
    if state is None:
        return None
    if state in OPEN:
        await _end(conn, reservation_id, "released", why, now)
    return await get(conn, reservation_id)


_EXPIRED_WAITING = (
    "SELECT id, 'expired', 'not refreshed by its client' FROM reservations"
    " WHERE state = 'waiting' AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
)
_EXPIRED_LEASES = (
    "SELECT id, 'expired', 'its lease ended' FROM reservations"
    " WHERE state = 'held' AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
)
_REVOKED = (
    "SELECT r.id, 'released', 'its token was revoked' FROM reservations r"
    " JOIN tokens t ON t.id = r.owner"
    " WHERE r.state IN ('waiting', 'held') AND t.revoked_at IS NOT NULL LIMIT $1"
)
#: Jobs queued again (a restart) after the reservation they name ended.
_ORPHANS = (
    "SELECT j.id, r.id, r.state FROM jobs j JOIN reservations r ON r.id = j.reservation"
    " WHERE j.reservation IS NOT NULL AND j.phase = 'queued'"
    " AND r.state IN ('released', 'expired') LIMIT $1"
)
#: Waiting ones still refreshed.
_WAITING = (
    "SELECT id, count, class, selector, priority, created_at FROM reservations"
    " WHERE state = 'waiting' AND expires_at > $1 ORDER BY priority DESC, created_at LIMIT $2"
)


async def _grants(
    conn: Connection, now: float, limit: int, checked: AbstractSet[str]
) -> tuple[list[tuple[str, list[str]]], dict[str, float]]:
    rows = await conn.fetch(_WAITING, now, limit)
    if not rows:
        return [], {}
    waiting = [
        scheduler.ReservationWanted(i, n, c, _selector.decode(s), p, at)
        for i, n, c, s, p, at in rows
    ]
    devices = await postgres_devices.lab_devices(conn, checked=checked)
    return scheduler.grant_reservations(waiting, devices), {w.id: w.created_at for w in waiting}


async def sweep_due(conn: Connection, now: float, checked: AbstractSet[str] = frozenset()) -> bool:
    """Some reservation is to be ended or granted now (a read: an idle lab writes
    nothing)."""
    for sql, args in (
        (_EXPIRED_WAITING, (now, 1)),
        (_EXPIRED_LEASES, (now, 1)),
        (_REVOKED, (1,)),
        (_ORPHANS, (1,)),
    ):
        if await conn.fetchrow(sql, *args) is not None:
            return True
    return bool((await _grants(conn, now, 1000, checked))[0])


async def sweep(
    conn: Connection, now: float, limit: int, checked: AbstractSet[str] = frozenset()
) -> Sweep:
    """One pass (sqlite_reservations.sweep). Writers of the lab take its supervisors'
    rows first, then the reservations' (claimed with SKIP LOCKED: a replica sweeping
    at the same moment leaves them to this one)."""
    await conn.execute(
        "SELECT 1 FROM supervisors WHERE id IN (SELECT DISTINCT supervisor_id FROM devices)"
        ' ORDER BY id COLLATE "C" FOR UPDATE'
    )
    ended: list[Ended] = []
    more = False
    kinds = (
        (_EXPIRED_WAITING, (now, limit)),
        (_EXPIRED_LEASES, (now, limit)),
        (_REVOKED, (limit,)),
    )
    for sql, args in kinds:
        rows = await conn.fetch(sql + " FOR UPDATE SKIP LOCKED", *args)
        more = more or len(rows) >= limit
        for reservation_id, state, why in rows:
            await _end(conn, reservation_id, state, why, now)
            ended.append(Ended(reservation_id, state, why))
    orphans = await conn.fetch(_ORPHANS, limit)
    more = more or len(orphans) >= limit
    for job_id, reservation_id, state in orphans:
        await _cancel(conn, job_id, reservation_id, state)
    grants, created = await _grants(conn, now, limit, checked)
    granted: list[tuple[str, float]] = []
    for reservation_id, chosen in grants:
        changed = await conn.fetchval(
            "UPDATE reservations SET state = 'held', granted_at = $1,"
            " expires_at = $1 + duration_s WHERE id = $2 AND state = 'waiting' RETURNING 1",
            now,
            reservation_id,
        )
        if changed is None:
            continue  # released meanwhile
        await conn.executemany(
            "INSERT INTO reservation_devices (reservation_id, device_id) VALUES ($1, $2)",
            [(reservation_id, device_id) for device_id in chosen],
        )
        granted.append((reservation_id, now - created[reservation_id]))
    return Sweep(ended, granted, more)


async def counts(conn: Connection) -> dict[str, int]:
    """state -> how many reservations (for the metrics)."""
    return {
        s: n for s, n in await conn.fetch("SELECT state, count(*) FROM reservations GROUP BY state")
    }
