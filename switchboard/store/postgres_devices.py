"""The hardware lab in the PostgreSQL store (sqlite_devices.py's SQL, translated): the
devices supervisors declare, their health and its history, and the devices granted to each
run (docs/lab.md).

Every function takes a connection inside the caller's transaction. A device belongs to one
supervisor, and every write that grants or frees devices holds that supervisor's row lock
(taken first, as in every write for a supervisor): two replicas can never grant one device
twice. What may be placed where is decided by switchboard.scheduler and switchboard.health.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import msgspec

from protocol.messages import DeviceInfo
from protocol.spec import JobSpec
from protocol.state import Phase
from switchboard import health, scheduler
from switchboard.models import DeviceView, HealthChange, PowerCall
from switchboard.store import records
from switchboard.store.postgres_engine import Connection
from switchboard.store.postgres_jobs import _INSERT_EVENT, cancel_job
from switchboard.store.schema import ACTIVE_LITERALS, TERMINAL_LITERALS
from switchboard.store.sqlite_devices import _LOST_HOLDERS, _RESERVED, HISTORY_SHOWN

log = logging.getLogger("switchboard.store")

_COLUMNS = records.DEVICE_COLUMNS
#: The run holding each device now: (device, job, attempt) of an active run granted it.
_HOLDERS = (
    "SELECT rd.device_id, rd.job_id, rd.attempt FROM run_devices rd"
    " JOIN runs r ON r.job_id = rd.job_id AND r.attempt = rd.attempt"
    f" WHERE r.phase IN ({ACTIVE_LITERALS})"
)
#: Devices with a check job that has not ended (they wait for it, and serve nothing else).
_CHECKING = "SELECT DISTINCT device_id FROM device_checks WHERE result IS NULL"


async def record_inventory(
    conn: Connection, supervisor_id: str, devices: Sequence[DeviceInfo], now: float
) -> list[str]:
    """Make the supervisor's devices those its hello declares (sqlite_devices.
    record_inventory): the ids another supervisor declares already are refused and
    returned. The caller holds the supervisor's row lock."""
    owners = {
        row[0]: row[1]
        for row in await conn.fetch(
            "SELECT id, supervisor_id FROM devices WHERE id = ANY($1::text[]) FOR UPDATE",
            [d.id for d in devices],
        )
    }
    refused, kept = [], []
    for device in devices:
        owner = owners.get(device.id)
        if owner is not None and owner != supervisor_id:
            refused.append(device.id)
            continue
        kept.append(device.id)
        facts = (
            device.class_,
            json.dumps(device.labels),
            int(device.console),
            int(device.power),
            now,
            device.id,
        )
        if owner is None:
            # Two supervisors declaring one new id at once: the first commit keeps it.
            made = await conn.fetchval(
                "INSERT INTO devices (class, labels, console, power, last_declared, id,"
                " supervisor_id, health_at, first_seen) VALUES ($1, $2, $3, $4, $5, $6, $7,"
                " $5, $5) ON CONFLICT (id) DO NOTHING RETURNING 1",
                *facts,
                supervisor_id,
            )
            if made is None:
                kept.pop()
                refused.append(device.id)
                continue
            await _history(
                conn, device.id, now, None, "unknown", f"supervisor {supervisor_id}", "declared"
            )
        else:
            await conn.execute(
                "UPDATE devices SET class = $1, labels = $2, console = $3, power = $4,"
                " last_declared = $5 WHERE id = $6",
                *facts,
            )
    gone = await conn.fetch(
        "DELETE FROM devices WHERE supervisor_id = $1 AND NOT (id = ANY($2::text[])) RETURNING id",
        supervisor_id,
        kept,
    )
    for (device_id,) in gone:
        log.info("device %s left the inventory of %s", device_id, supervisor_id)
        # Its check, if still queued, could never be placed: it ends now.
        waiting = await conn.fetch(
            "SELECT c.job_id FROM device_checks c JOIN jobs j ON j.id = c.job_id"
            " WHERE c.device_id = $1 AND c.result IS NULL AND j.phase = 'queued'",
            device_id,
        )
        for (job_id,) in waiting:
            why = f"its device {device_id} left the inventory"
            await cancel_job(conn, job_id, f"supervisor {supervisor_id}", why)
    return refused


async def _history(
    conn: Connection,
    device_id: str,
    now: float,
    before: str | None,
    after: str,
    actor: str,
    reason: str,
    job_id: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO device_health_history (device_id, at, health_from, health_to, actor,"
        " reason, job_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        device_id,
        now,
        before,
        after,
        actor,
        reason,
        job_id,
    )


async def set_health(
    conn: Connection,
    device_id: str,
    health_: str,
    actor: str,
    reason: str,
    now: float,
    job_id: str | None = None,
) -> DeviceView | None:
    """Set a device's health, kept in its history (the same health again changes
    nothing); None if there is no such device."""
    before = await conn.fetchval("SELECT health FROM devices WHERE id = $1 FOR UPDATE", device_id)
    if before is None:
        return None
    if before != health_:
        await conn.execute(
            "UPDATE devices SET health = $1, health_reason = $2, health_at = $3 WHERE id = $4",
            health_,
            reason,
            now,
            device_id,
        )
        await _history(conn, device_id, now, before, health_, actor, reason, job_id)
    return await get_device(conn, device_id)


async def _holders(conn: Connection, device_id: str | None = None) -> dict[str, str]:
    """device id -> "job#attempt" of the run holding it."""
    if device_id is None:
        rows = await conn.fetch(_HOLDERS)
    else:
        rows = await conn.fetch(_HOLDERS + " AND rd.device_id = $1", device_id)
    return {d: f"{j}#{a}" for d, j, a in rows}


async def _pending_checks(conn: Connection, device_id: str | None = None) -> dict[str, str]:
    """device id -> its check job that has not ended."""
    sql = "SELECT device_id, job_id FROM device_checks WHERE result IS NULL"
    if device_id is None:
        return {d: j for d, j in await conn.fetch(sql)}
    return {d: j for d, j in await conn.fetch(sql + " AND device_id = $1", device_id)}


async def _reserved(conn: Connection, device_id: str | None = None) -> dict[str, str]:
    if device_id is None:
        return {d: r for d, r in await conn.fetch(_RESERVED)}
    return {d: r for d, r in await conn.fetch(_RESERVED + " AND rd.device_id = $1", device_id)}


async def list_devices(
    conn: Connection,
    class_: str | None = None,
    health_: str | None = None,
    supervisor_id: str | None = None,
) -> list[DeviceView]:
    terms: list[str] = []
    args: list[object] = []
    for column, value in (("class", class_), ("health", health_), ("supervisor_id", supervisor_id)):
        if value is not None:
            args.append(value)
            terms.append(f"{column} = ${len(args)}")
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    rows = await conn.fetch(f'SELECT {_COLUMNS} FROM devices{where} ORDER BY id COLLATE "C"', *args)
    if not rows:
        return []
    holders, checks, reserved = (
        await _holders(conn),
        await _pending_checks(conn),
        await _reserved(conn),
    )
    return [records.device_view(row, holders, checks, reserved) for row in rows]


async def get_device(conn: Connection, device_id: str) -> DeviceView | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM devices WHERE id = $1", device_id)
    if row is None:
        return None
    view = records.device_view(
        row,
        await _holders(conn, device_id),
        await _pending_checks(conn, device_id),
        await _reserved(conn, device_id),
    )
    changes = await conn.fetch(
        "SELECT at, health_to, actor, reason, health_from, job_id FROM device_health_history"
        " WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
        device_id,
        HISTORY_SHOWN,
    )
    calls = await conn.fetch(
        "SELECT at, actor, action, result, exit_code, reason, job_id FROM device_power_calls"
        " WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
        device_id,
        HISTORY_SHOWN,
    )
    return msgspec.structs.replace(
        view,
        history=[HealthChange(*c) for c in changes],
        power_history=[PowerCall(*c) for c in calls],
    )


async def recovery_health(
    conn: Connection,
    device_id: str,
    check_job: str,
    health_: str,
    actor: str,
    reason: str,
    now: float,
) -> bool:
    """Set a device's health for its recovery, with the failed check `check_job`, only if it
    is still `bad` from that check (nobody changed it since); whether it was set."""
    row = await conn.fetchrow(
        "SELECT health, check_job FROM devices WHERE id = $1 FOR UPDATE", device_id
    )
    if row is None or row[0] != "bad" or row[1] != check_job:
        return False
    await set_health(conn, device_id, health_, actor, reason, now, check_job)
    return True


async def record_power_call(conn: Connection, device_id: str, call: PowerCall) -> PowerCall:
    """Keep a power call in the device's history and in a job's events (its timeline):
    the run holding the device, if one does, else the job the call was made for
    (sqlite_devices.record_power_call). The call as kept, with that job."""
    found = await conn.fetchrow(_HOLDERS + " AND rd.device_id = $1 LIMIT 1", device_id)
    held = None if found is None else (found[1], found[2])
    if held is None and call.job_id is not None:
        held = await conn.fetchrow(
            "SELECT job_id, max(attempt) FROM runs WHERE job_id = $1 GROUP BY job_id",
            call.job_id,
        )
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
        await conn.execute(
            _INSERT_EVENT, job_id, call.at, "power", message, attempt, call.actor or None
        )
    await conn.execute(
        "INSERT INTO device_power_calls (device_id, at, actor, action, result, exit_code,"
        " reason, job_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        device_id,
        call.at,
        call.actor,
        call.action,
        call.result,
        call.exit_code,
        call.reason,
        call.job_id,
    )
    return call


async def lab_devices(
    conn: Connection, supervisor_id: str | None = None, checked: AbstractSet[str] = frozenset()
) -> list[scheduler.LabDevice]:
    """Every device (of one supervisor) as placement sees it (sqlite_devices.lab_devices)."""
    if supervisor_id is None:
        rows = await conn.fetch("SELECT id, supervisor_id, class, health, labels FROM devices")
    else:
        rows = await conn.fetch(
            "SELECT id, supervisor_id, class, health, labels FROM devices WHERE supervisor_id = $1",
            supervisor_id,
        )
    if not rows:
        return []
    held = await _holders(conn)
    checking = {row[0] for row in await conn.fetch(_CHECKING)}
    reserved = await _reserved(conn)
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
        for i, s, c, h, labels in rows
    ]


async def grant(
    conn: Connection,
    job_id: str,
    attempt: int,
    supervisor_id: str,
    spec: JobSpec,
    checked: AbstractSet[str] = frozenset(),
) -> list[str] | None:
    """Grant the run the devices of its supervisor it asks for (scheduler.grant) and
    record them; None (nothing recorded) if they are not free now. The caller holds the
    supervisor's row lock, so no other writer grants its devices meanwhile."""
    if not spec.resources and not spec.devices:
        return []
    devices = await lab_devices(conn, supervisor_id, checked)
    if not devices:
        return None if spec.devices else []
    checks = await conn.fetchval("SELECT device_id FROM device_checks WHERE job_id = $1", job_id)
    # The devices its last run was refused with are its last choice (scheduler.grant).
    before = await conn.fetch(
        "SELECT rd.device_id FROM run_devices rd JOIN runs r"
        " ON r.job_id = rd.job_id AND r.attempt = rd.attempt"
        " WHERE rd.job_id = $1 AND rd.attempt = $2 AND r.phase = 'rejected'",
        job_id,
        attempt - 1,
    )
    avoid = {row[0] for row in before}
    entries = [] if checks is not None else spec.devices
    chosen = scheduler.grant(spec.resources, devices, checks, avoid, spec.reservation, entries)
    if chosen is None:
        return None
    # The entries' devices come last, in their order: each with its role, if it has one.
    roles = [None] * (len(chosen) - len(entries)) + [e.role for e in entries]
    await conn.executemany(
        "INSERT INTO run_devices (job_id, attempt, device_id, role, pos)"
        " VALUES ($1, $2, $3, $4, $5)",
        [
            (job_id, attempt, d, role, pos)
            for pos, (d, role) in enumerate(zip(chosen, roles, strict=True))
        ],
    )
    return chosen


async def run_devices(conn: Connection, job_id: str, attempt: int) -> tuple[str, ...]:
    rows = await conn.fetch(
        "SELECT device_id FROM run_devices WHERE job_id = $1 AND attempt = $2"
        ' ORDER BY pos, device_id COLLATE "C"',
        job_id,
        attempt,
    )
    return tuple(r[0] for r in rows)


async def device_facts(conn: Connection) -> list[health.DeviceFacts]:
    """What deciding which devices need a check looks at, for every device."""
    checking = {row[0] for row in await conn.fetch(_CHECKING)}
    rows = await conn.fetch(
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


async def start_checks(conn: Connection, checks: Sequence[tuple[str, str]], now: float) -> None:
    """Record check jobs just inserted: (job id, the device it checks)."""
    await conn.executemany(
        "INSERT INTO device_checks (job_id, device_id, created_at) VALUES ($1, $2, $3)",
        [(job_id, device_id, now) for job_id, device_id in checks],
    )


#: Pending checks whose job has ended, or is gone.
_ENDED_CHECKS = (
    "SELECT c.job_id, c.device_id, j.phase FROM device_checks c"
    " LEFT JOIN jobs j ON j.id = c.job_id"
    f" WHERE c.result IS NULL AND (j.phase IS NULL OR j.phase IN ({TERMINAL_LITERALS}))"
)


async def checks_to_finish(conn: Connection) -> bool:
    """Some health check has ended (a cheap read: finish_checks writes only if so)."""
    return await conn.fetchval(_ENDED_CHECKS + " LIMIT 1") is not None


async def lost_holders(conn: Connection) -> bool:
    """Some device is held by a lost run and not yet in doubt (see runs_lost)."""
    return await conn.fetchval(_LOST_HOLDERS + " LIMIT 1") is not None


async def finish_checks(conn: Connection, now: float) -> list[tuple[str, str, str, str]]:
    """Give each device whose check job has ended the health its ending says
    (sqlite_devices.finish_checks); (device, job, result, health) for each. The checks
    are claimed with SKIP LOCKED: two replicas never finish one twice."""
    rows = await conn.fetch(_ENDED_CHECKS + " FOR UPDATE OF c SKIP LOCKED")
    done = []
    for job_id, device_id, phase in rows:
        found = await conn.fetchval("SELECT health FROM devices WHERE id = $1", device_id)
        if found is None:  # it left the inventory meanwhile
            await conn.execute(
                "UPDATE device_checks SET result = 'error', ended_at = $1 WHERE job_id = $2",
                now,
                job_id,
            )
            continue
        result, after = health.check_outcome(Phase(phase or Phase.LOST), found)
        await conn.execute(
            "UPDATE device_checks SET result = $1, ended_at = $2 WHERE job_id = $3",
            result,
            now,
            job_id,
        )
        await conn.execute(
            "UPDATE devices SET check_result = $1, check_at = $2, check_job = $3 WHERE id = $4",
            result,
            now,
            job_id,
            device_id,
        )
        why = f"health check {result}ed" if result != "error" else "health check not run"
        await set_health(conn, device_id, after, "health check", f"{why} ({phase})", now, job_id)
        done.append((device_id, job_id, result, after))
    return done


async def runs_lost(conn: Connection, now: float) -> list[str]:
    """Devices granted to a regular run that ended in doubt since their health was last
    set: their state is in doubt (health.after_run); the ids of those changed."""
    rows = await conn.fetch(_LOST_HOLDERS)
    changed: list[str] = []
    for device_id, current, job_id, phase, error_kind in rows:
        after = health.after_run(current, Phase(phase), error_kind)
        if after is not None and device_id not in changed:
            reason = (
                f"run of job {job_id} lost with its host"
                if phase == Phase.LOST
                else f"run of job {job_id} refused: {error_kind}"
            )
            await set_health(conn, device_id, after, "switchboard", reason, now, job_id)
            changed.append(device_id)
    return changed


async def health_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """(health, class) -> how many devices (for the metrics)."""
    rows = await conn.fetch("SELECT health, class, count(*) FROM devices GROUP BY health, class")
    return {(h, c): n for h, c, n in rows}


async def check_device(conn: Connection, job_id: str) -> str | None:
    """The device a health-check job checks (None: it is no check)."""
    found: str | None = await conn.fetchval(
        "SELECT device_id FROM device_checks WHERE job_id = $1", job_id
    )
    return found
