"""The hardware lab in the SQLite store: the devices supervisors declare, their health and
its history, and the devices granted to each run (docs/lab.md).

Every function takes the open connection and runs inside the caller's transaction. What
may be placed where is decided by switchboard.scheduler and switchboard.health; this
module reads the facts they need and writes their answers.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import msgspec

from protocol.messages import DeviceInfo
from protocol.spec import JobSpec
from protocol.state import Phase
from switchboard import health, scheduler
from switchboard.models import DeviceView, HealthChange, PowerCall
from switchboard.store import records
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL, TERMINAL_PHASES, TERMINAL_SQL
from switchboard.store.sqlite_jobs import cancel_job, record_event

log = logging.getLogger("switchboard.store")

_COLUMNS = records.DEVICE_COLUMNS

#: Health changes one device's view shows (newest first).
HISTORY_SHOWN = 100

#: Held reservations' devices: device id -> reservation id.
_RESERVED = (
    "SELECT rd.device_id, rd.reservation_id FROM reservation_devices rd"
    " JOIN reservations r ON r.id = rd.reservation_id WHERE r.state = 'held'"
)

#: The run (job id, attempt) holding a device now.
_HOLDERS_RUNS = (
    "SELECT rd.job_id, rd.attempt FROM run_devices rd"
    " JOIN runs r ON r.job_id = rd.job_id AND r.attempt = rd.attempt"
    f" WHERE r.phase IN ({ACTIVE_SQL})"
)

#: The run holding each device now (an active run among those it was granted to).
_HOLDERS = (
    "SELECT rd.device_id, rd.job_id || '#' || rd.attempt FROM run_devices rd"
    " JOIN runs r ON r.job_id = rd.job_id AND r.attempt = rd.attempt"
    f" WHERE r.phase IN ({ACTIVE_SQL})"
)


def record_inventory(
    conn: sqlite3.Connection, supervisor_id: str, devices: Sequence[DeviceInfo], now: float
) -> list[str]:
    """Make the supervisor's devices those its hello declares: new ones start `unknown`
    (in the history), known ones keep their health, ones it no longer declares leave the
    inventory (their history stays). A device id another supervisor declares already is
    not taken: the ids refused that way are returned."""
    owners = dict(
        conn.execute(
            f"SELECT id, supervisor_id FROM devices WHERE id IN ({', '.join('?' * len(devices))})",
            [d.id for d in devices],
        ).fetchall()
        if devices
        else []
    )
    refused, kept = [], []
    for device in devices:
        owner = owners.get(device.id)
        if owner is not None and owner != supervisor_id:
            refused.append(device.id)
            continue
        kept.append(device.id)
        if owner is None:
            conn.execute(
                "INSERT INTO devices (id, supervisor_id, class, labels, console, power,"
                " health_at, first_seen, last_declared) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device.id,
                    supervisor_id,
                    device.class_,
                    json.dumps(device.labels),
                    int(device.console),
                    int(device.power),
                    now,
                    now,
                    now,
                ),
            )
            _history(
                conn, device.id, now, None, "unknown", f"supervisor {supervisor_id}", "declared"
            )
        else:
            conn.execute(
                "UPDATE devices SET class = ?, labels = ?, console = ?, power = ?,"
                " last_declared = ? WHERE id = ?",
                (
                    device.class_,
                    json.dumps(device.labels),
                    int(device.console),
                    int(device.power),
                    now,
                    device.id,
                ),
            )
    gone = [
        row[0]
        for row in conn.execute("SELECT id FROM devices WHERE supervisor_id = ?", (supervisor_id,))
        if row[0] not in set(kept)
    ]
    for device_id in gone:
        conn.execute("DELETE FROM devices WHERE id = ?", (device_id,))
        log.info("device %s left the inventory of %s", device_id, supervisor_id)
        # Its check, if still queued, could never be placed: it ends now.
        waiting = conn.execute(
            "SELECT c.job_id FROM device_checks c JOIN jobs j ON j.id = c.job_id"
            " WHERE c.device_id = ? AND c.result IS NULL AND j.phase = 'queued'",
            (device_id,),
        ).fetchall()
        for (job_id,) in waiting:
            why = f"its device {device_id} left the inventory"
            cancel_job(conn, job_id, f"supervisor {supervisor_id}", why)
    return refused


def _history(
    conn: sqlite3.Connection,
    device_id: str,
    now: float,
    before: str | None,
    after: str,
    actor: str,
    reason: str,
    job_id: str | None = None,
) -> None:
    conn.execute(
        "INSERT INTO device_health_history (device_id, at, health_from, health_to, actor,"
        " reason, job_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (device_id, now, before, after, actor, reason, job_id),
    )


def set_health(
    conn: sqlite3.Connection,
    device_id: str,
    health: str,
    actor: str,
    reason: str,
    now: float,
    job_id: str | None = None,
) -> DeviceView | None:
    """Set a device's health, kept in its history with who and why (the same health again
    changes nothing); None if there is no such device."""
    row = conn.execute("SELECT health FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is None:
        return None
    if row[0] != health:
        conn.execute(
            "UPDATE devices SET health = ?, health_reason = ?, health_at = ? WHERE id = ?",
            (health, reason, now, device_id),
        )
        _history(conn, device_id, now, row[0], health, actor, reason, job_id)
    return get_device(conn, device_id)


def recovery_health(
    conn: sqlite3.Connection,
    device_id: str,
    check_job: str,
    health: str,
    actor: str,
    reason: str,
    now: float,
) -> bool:
    """Set a device's health for its recovery, with the failed check `check_job`, only if it
    is still `bad` from that check (nobody changed it since); whether it was set."""
    row = conn.execute(
        "SELECT health, check_job FROM devices WHERE id = ?", (device_id,)
    ).fetchone()
    if row is None or row[0] != "bad" or row[1] != check_job:
        return False
    set_health(conn, device_id, health, actor, reason, now, check_job)
    return True


def _holders(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute(_HOLDERS, ACTIVE_PHASES).fetchall())


def _pending_checks(conn: sqlite3.Connection, device_id: str | None = None) -> dict[str, str]:
    """device id -> its check job that has not ended."""
    sql = "SELECT device_id, job_id FROM device_checks WHERE result IS NULL"
    if device_id is not None:
        return dict(conn.execute(sql + " AND device_id = ?", (device_id,)).fetchall())
    return dict(conn.execute(sql).fetchall())


def list_devices(
    conn: sqlite3.Connection,
    class_: str | None = None,
    health: str | None = None,
    supervisor_id: str | None = None,
) -> list[DeviceView]:
    terms, args = [], []
    for column, value in (("class", class_), ("health", health), ("supervisor_id", supervisor_id)):
        if value is not None:
            terms.append(f"{column} = ?")
            args.append(value)
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM devices{where} ORDER BY id", args).fetchall()
    holders = _holders(conn) if rows else {}
    checks = _pending_checks(conn) if rows else {}
    reserved = dict(conn.execute(_RESERVED).fetchall()) if rows else {}
    return [records.device_view(row, holders, checks, reserved) for row in rows]


def get_device(conn: sqlite3.Connection, device_id: str) -> DeviceView | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is None:
        return None
    holder = conn.execute(_HOLDERS + " AND rd.device_id = ?", (*ACTIVE_PHASES, device_id))
    reserved = dict(conn.execute(_RESERVED + " AND rd.device_id = ?", (device_id,)).fetchall())
    view = records.device_view(
        row, dict(holder.fetchall()), _pending_checks(conn, device_id), reserved
    )
    changes = conn.execute(
        "SELECT at, health_to, actor, reason, health_from, job_id FROM device_health_history"
        " WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
        (device_id, HISTORY_SHOWN),
    )
    history = [HealthChange(*c) for c in changes]
    calls = conn.execute(
        "SELECT at, actor, action, result, exit_code, reason, job_id FROM device_power_calls"
        " WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
        (device_id, HISTORY_SHOWN),
    )
    return msgspec.structs.replace(
        view, history=history, power_history=[PowerCall(*c) for c in calls]
    )


def record_power_call(conn: sqlite3.Connection, device_id: str, call: PowerCall) -> PowerCall:
    """Keep a power call in the device's history and in a job's events (its timeline): the
    run holding the device, if one does, else the job the call was made for (`job_id`: the
    failed check a recovery cycles the device after), if it is still there. The call as
    kept, with that job."""
    held = conn.execute(
        _HOLDERS_RUNS + " AND rd.device_id = ?", (*ACTIVE_PHASES, device_id)
    ).fetchone()
    if held is None and call.job_id is not None:
        held = conn.execute(
            "SELECT job_id, max(attempt) FROM runs WHERE job_id = ? GROUP BY job_id",
            (call.job_id,),
        ).fetchone()
    if held is not None:
        job_id, attempt = held
        call = msgspec.structs.replace(call, job_id=job_id)
        outcome = (
            call.result
            if call.exit_code is None
            else f"{call.result}, exit status {call.exit_code}"
        )
        message = f"power {call.action} of device {device_id}: {outcome}"
        if call.reason:
            message += f" ({call.reason})"
        record_event(conn, job_id, "power", message, attempt=attempt, actor=call.actor, at=call.at)
    conn.execute(
        "INSERT INTO device_power_calls (device_id, at, actor, action, result, exit_code,"
        " reason, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            device_id,
            call.at,
            call.actor,
            call.action,
            call.result,
            call.exit_code,
            call.reason,
            call.job_id,
        ),
    )
    return call


#: Devices with a check job that has not ended (they wait for it, and serve nothing else).
_CHECKING = (
    "SELECT DISTINCT device_id FROM device_checks INDEXED BY device_checks_pending"
    " WHERE result IS NULL"
)


def lab_devices(
    conn: sqlite3.Connection,
    supervisor_id: str | None = None,
    checked: AbstractSet[str] = frozenset(),
) -> list[scheduler.LabDevice]:
    """Every device (of one supervisor) as placement sees it. A device of a `checked`
    class (one with a health check) whose health is unknown waits for its check, whether
    or not its check job has been queued yet."""
    where, args = ("WHERE supervisor_id = ?", [supervisor_id]) if supervisor_id else ("", [])
    rows = conn.execute(
        f"SELECT id, supervisor_id, class, health, labels FROM devices {where}", args
    )
    devices = rows.fetchall()
    if not devices:
        return []
    held = _holders(conn)
    checking = {row[0] for row in conn.execute(_CHECKING)}
    reserved = dict(conn.execute(_RESERVED).fetchall())
    return [
        scheduler.LabDevice(
            i,
            s,
            c,
            h,
            i in held,
            i in checking or (c in checked and h == "unknown"),
            reserved.get(i),
            json.loads(labels),
        )
        for i, s, c, h, labels in devices
    ]


def checked_device(conn: sqlite3.Connection, job_id: str) -> str | None:
    """The device a health-check job checks (None: it is no check)."""
    row = conn.execute("SELECT device_id FROM device_checks WHERE job_id = ?", (job_id,))
    found = row.fetchone()
    return found[0] if found else None


def grant(
    conn: sqlite3.Connection,
    job_id: str,
    attempt: int,
    supervisor_id: str,
    spec: JobSpec,
    checked: AbstractSet[str] = frozenset(),
) -> list[str] | None:
    """Grant the run the devices of its supervisor that it asks for (scheduler.grant; a
    health check, the device it checks) and record them; None (nothing recorded) if they
    are not free now."""
    if not spec.resources and not spec.devices:
        return []
    devices = lab_devices(conn, supervisor_id, checked)
    if not devices:
        return None if spec.devices else []
    checks = checked_device(conn, job_id)
    # The devices its last run was refused with are its last choice (scheduler.grant).
    before = conn.execute(
        "SELECT rd.device_id FROM run_devices rd JOIN runs r"
        " ON r.job_id = rd.job_id AND r.attempt = rd.attempt"
        " WHERE rd.job_id = ? AND rd.attempt = ? AND r.phase = 'rejected'",
        (job_id, attempt - 1),
    )
    avoid = {row[0] for row in before}
    entries = [] if checks is not None else spec.devices
    chosen = scheduler.grant(spec.resources, devices, checks, avoid, spec.reservation, entries)
    if chosen is None:
        return None
    # The entries' devices come last, in their order: each with its role, if it has one.
    roles = [None] * (len(chosen) - len(entries)) + [e.role for e in entries]
    conn.executemany(
        "INSERT INTO run_devices (job_id, attempt, device_id, role, pos) VALUES (?, ?, ?, ?, ?)",
        [
            (job_id, attempt, d, role, pos)
            for pos, (d, role) in enumerate(zip(chosen, roles, strict=True))
        ],
    )
    return chosen


def run_devices(conn: sqlite3.Connection, job_id: str, attempt: int) -> tuple[str, ...]:
    rows = conn.execute(
        "SELECT device_id FROM run_devices WHERE job_id = ? AND attempt = ?"
        " ORDER BY pos, device_id",
        (job_id, attempt),
    )
    return tuple(r[0] for r in rows)


def device_facts(conn: sqlite3.Connection) -> list[health.DeviceFacts]:
    """What deciding which devices need a check looks at, for every device."""
    checking = {row[0] for row in conn.execute(_CHECKING)}
    rows = conn.execute(
        "SELECT d.id, d.class, d.health, d.check_at, d.check_result,"
        " (SELECT count(*) FROM run_devices rd JOIN runs r"
        "  ON r.job_id = rd.job_id AND r.attempt = rd.attempt"
        "  WHERE rd.device_id = d.id AND r.created_at > coalesce(d.check_at, 0)"
        "  AND rd.job_id NOT IN (SELECT job_id FROM device_checks WHERE device_id = d.id))"
        " FROM devices d"
    )
    return [
        health.DeviceFacts(i, c, h, at, result, i in checking, n) for i, c, h, at, result, n in rows
    ]


def start_checks(conn: sqlite3.Connection, checks: Sequence[tuple[str, str]], now: float) -> None:
    """Record check jobs just inserted: (job id, the device it checks)."""
    conn.executemany(
        "INSERT INTO device_checks (job_id, device_id, created_at) VALUES (?, ?, ?)",
        [(job_id, device_id, now) for job_id, device_id in checks],
    )


#: Pending checks whose job has ended, or is gone.
_ENDED_CHECKS = (
    "SELECT c.job_id, c.device_id, j.phase FROM device_checks c"
    " LEFT JOIN jobs j ON j.id = c.job_id"
    f" WHERE c.result IS NULL AND (j.phase IS NULL OR j.phase IN ({TERMINAL_SQL}))"
)
#: Devices granted to a regular run that ended in doubt (health.in_doubt) since their
#: health was last set.
_LOST_HOLDERS = (
    "SELECT DISTINCT d.id, d.health, rd.job_id, r.phase, r.error_kind FROM devices d"
    " JOIN run_devices rd ON rd.device_id = d.id"
    " JOIN runs r ON r.job_id = rd.job_id AND r.attempt = rd.attempt"
    f" WHERE (r.phase IN ({', '.join(repr(p.value) for p in health.DOUBT_PHASES)})"
    f" OR (r.phase = 'rejected' AND r.error_kind IN ({', '.join(map(repr, health.DOUBT_ERRORS))})))"
    " AND r.ended_at >= d.health_at"
    f" AND d.health IN ({', '.join(repr(h) for h in sorted(health.PLACEABLE - {'unknown'}))})"
    " AND rd.job_id NOT IN (SELECT job_id FROM device_checks)"
)


def checks_to_finish(conn: sqlite3.Connection) -> bool:
    """Some health check has ended (a cheap read: finish_checks writes only if so)."""
    return conn.execute(_ENDED_CHECKS + " LIMIT 1", TERMINAL_PHASES).fetchone() is not None


def lost_holders(conn: sqlite3.Connection) -> bool:
    """Some device is held by a lost run and not yet in doubt (see runs_lost)."""
    return conn.execute(_LOST_HOLDERS + " LIMIT 1").fetchone() is not None


def finish_checks(conn: sqlite3.Connection, now: float) -> list[tuple[str, str, str, str]]:
    """Give each device whose check job has ended the health its ending says
    (health.check_outcome), in its history with the job; (device, job, result, health) for
    each. A check whose job is gone (deleted) ends as an error."""
    rows = conn.execute(_ENDED_CHECKS, TERMINAL_PHASES).fetchall()
    done = []
    for job_id, device_id, phase in rows:
        found = conn.execute("SELECT health FROM devices WHERE id = ?", (device_id,)).fetchone()
        if found is None:  # it left the inventory meanwhile
            conn.execute(
                "UPDATE device_checks SET result = 'error', ended_at = ? WHERE job_id = ?",
                (now, job_id),
            )
            continue
        result, after = health.check_outcome(Phase(phase or Phase.LOST), found[0])
        conn.execute(
            "UPDATE device_checks SET result = ?, ended_at = ? WHERE job_id = ?",
            (result, now, job_id),
        )
        conn.execute(
            "UPDATE devices SET check_result = ?, check_at = ?, check_job = ? WHERE id = ?",
            (result, now, job_id, device_id),
        )
        why = f"health check {result}ed" if result != "error" else "health check not run"
        set_health(conn, device_id, after, "health check", f"{why} ({phase})", now, job_id)
        done.append((device_id, job_id, result, after))
    return done


def runs_lost(conn: sqlite3.Connection, now: float) -> list[str]:
    """Devices granted to a regular run that ended in doubt since their health was last
    set (lost with its host, or refused: its supervisor could not give it the device):
    their state is in doubt (health.after_run); the ids of those changed."""
    rows = conn.execute(_LOST_HOLDERS).fetchall()
    changed = []
    for device_id, current, job_id, phase, error_kind in rows:
        after = health.after_run(current, Phase(phase), error_kind)
        if after is not None and device_id not in changed:
            reason = (
                f"run of job {job_id} lost with its host"
                if phase == Phase.LOST
                else f"run of job {job_id} refused: {error_kind}"
            )
            set_health(conn, device_id, after, "switchboard", reason, now, job_id)
            changed.append(device_id)
    return changed


def health_counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """(health, class) -> how many devices (for the metrics)."""
    rows = conn.execute("SELECT health, class, count(*) FROM devices GROUP BY health, class")
    return {(h, c): n for h, c, n in rows}
