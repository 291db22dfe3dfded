"""Rows into records, for every store: the SQLite and PostgreSQL stores select the same
columns in the same order and hand the rows here (a sqlite3 row and an asyncpg Record
both index by position), so what a record holds is decided once.

Pure: no connection, no SQL beyond the column lists both stores select.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from protocol.spec import JobSpec, Selector
from protocol.state import Phase
from switchboard import gangs
from switchboard.models import (
    TEST_RESULTS,
    DeviceView,
    FinishedMinute,
    GroupRoleView,
    GroupView,
    JobEvent,
    JobSummary,
    JobView,
    PhaseEntry,
    ReservationView,
    RunView,
    SupervisorView,
    TestCase,
    TestCounts,
)

Row = Sequence[Any]

_spec_decoder = msgspec.json.Decoder(JobSpec)
_selector_decoder = msgspec.json.Decoder(Selector)


def decode_spec(raw: bytes) -> JobSpec:
    return _spec_decoder.decode(raw)


#: The columns of a job summary (list_jobs), after the job's seq.
SUMMARY_COLUMNS = (
    "j.seq, j.id, j.name, j.phase, j.priority, j.created_at, j.updated_at, j.labels,"
    " j.attempts, (SELECT supervisor_id FROM runs r WHERE r.job_id = j.id"
    "  AND r.attempt = j.attempts), j.exit_code, j.reason, j.unschedulable, j.owner"
)


def job_summary(r: Row) -> tuple[int, JobSummary]:
    """A row of SUMMARY_COLUMNS: the job's seq (the list's cursor) and its summary."""
    return (
        r[0],
        JobSummary(
            id=r[1],
            name=r[2],
            phase=Phase(r[3]),
            priority=r[4],
            created_at=r[5],
            updated_at=r[6],
            labels=json.loads(r[7]),
            attempts=r[8],
            supervisor_id=r[9],
            exit_code=r[10],
            reason=r[11],
            unschedulable=r[12],
            owner=r[13],
        ),
    )


#: The columns of a job (load_job); `t` is the owner's token, joined.
JOB_COLUMNS = (
    "j.id, j.name, j.phase, j.spec, j.created_at, j.updated_at, j.priority,"
    " j.exit_code, j.reason, j.cancel_requested, j.unschedulable, j.owner, t.name,"
    " j.waiting_for, (SELECT g.group_id FROM group_roles g WHERE g.job_id = j.id)"
)
#: The columns of a run (load_job), in attempt order.
RUN_COLUMNS = (
    "attempt, supervisor_id, phase, created_at, stage, message, exit_code, signal,"
    " reason, error_kind, error, started_at, ended_at, output_bytes, output_truncated"
)
#: The columns of a run's phase history, in the order written.
PHASE_COLUMNS = "attempt, phase, stage, message, at"


def job_view(
    row: Row, run_rows: Iterable[Row], phase_rows: Iterable[Row], device_rows: Iterable[Row] = ()
) -> JobView:
    """A job from a row of JOB_COLUMNS, its runs' rows (RUN_COLUMNS), their phase history
    (PHASE_COLUMNS) and the devices granted to them ((attempt, device id, role) rows, in
    the order granted)."""
    phases: dict[int, list[PhaseEntry]] = {}
    for attempt, phase, stage, message, at in phase_rows:
        phases.setdefault(attempt, []).append(PhaseEntry(Phase(phase), at, stage, message))
    devices: dict[int, list[str]] = {}
    roles: dict[int, dict[str, str]] = {}
    for attempt, device_id, role in device_rows:
        devices.setdefault(attempt, []).append(device_id)
        if role is not None:
            roles.setdefault(attempt, {})[role] = device_id
    runs = [
        RunView(
            attempt=r[0],
            supervisor_id=r[1],
            phase=Phase(r[2]),
            created_at=r[3],
            stage=r[4],
            message=r[5],
            exit_code=r[6],
            signal=r[7],
            reason=r[8],
            error_kind=r[9],
            error=r[10],
            started_at=r[11],
            ended_at=r[12],
            phases=phases.get(r[0], []),
            output_bytes=r[13],
            output_truncated=r[14].split(",") if r[14] else [],
            devices=devices.get(r[0], []),
            device_roles=roles.get(r[0], {}),
        )
        for r in run_rows
    ]
    return JobView(
        id=row[0],
        name=row[1],
        phase=Phase(row[2]),
        spec=decode_spec(row[3]),
        created_at=row[4],
        updated_at=row[5],
        priority=row[6],
        exit_code=row[7],
        reason=row[8],
        cancel_requested=bool(row[9]),
        unschedulable=row[10],
        owner=row[11],
        owner_name=row[12],
        waiting_for=row[13],
        group=row[14],
        runs=runs,
    )


#: The columns of a job's own events, in the order written.
EVENT_COLUMNS = "at, kind, message, attempt, actor"


def job_events(event_rows: Iterable[Row], phase_rows: Iterable[Row]) -> list[JobEvent]:
    """A job's audit trail: its events (EVENT_COLUMNS) and its runs' phase changes
    (PHASE_COLUMNS), in time order."""
    events = [
        JobEvent(at=r[0], kind=r[1], message=r[2], attempt=r[3], actor=r[4]) for r in event_rows
    ]
    for attempt, phase, stage, message, at in phase_rows:
        text = f"run {attempt}: {phase}"
        if stage:
            text += f" ({stage})"
        if message:
            text += f": {message}"
        events.append(JobEvent(at=at, kind="run_phase", message=text, attempt=attempt))
    events.sort(key=lambda e: e.at)  # stable: same-instant entries keep their order
    return events


#: The columns of a supervisor's record.
SUPERVISOR_COLUMNS = (
    "id, name, connected, labels, backends, resources, max_jobs, session,"
    " software, connected_at, last_seen, drained, operator_labels, protocol"
)


def supervisor_view(r: Row, counts: dict[str, int]) -> SupervisorView:
    """A supervisor from a row of SUPERVISOR_COLUMNS; `counts`: active runs by id."""
    advertised, operator_labels = json.loads(r[3]), json.loads(r[12])
    return SupervisorView(
        id=r[0],
        name=r[1],
        connected=bool(r[2]),
        labels={**advertised, **operator_labels},
        operator_labels=operator_labels,
        advertised_labels=advertised,
        drained=bool(r[11]),
        backends=json.loads(r[4]),
        resources=json.loads(r[5]),
        max_jobs=r[6],
        running=counts.get(r[0], 0),
        session=r[7],
        software=r[8],
        connected_at=r[9],
        last_seen=r[10],
        protocol=r[13],
    )


def add_resources(used: dict[str, dict[str, int]], supervisor_id: str, resources: str) -> None:
    """Count the resources (a job's JSON) one active run holds on its supervisor."""
    held = used.setdefault(supervisor_id, {})
    for name, count in json.loads(resources).items():
        held[name] = held.get(name, 0) + count


def output_range(rows: Iterable[Row], start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a stream from its chunks (offset, data) in offset order."""
    parts = []
    for offset, data in rows:
        lo = max(start - offset, 0)
        hi = min(stop - offset, len(data))
        parts.append(data[lo:hi])
    return b"".join(parts)


def freed_by_attempt(deleted: Iterable[Row]) -> dict[int, int]:
    """Bytes freed per attempt, from the deleted chunks' (attempt, size)."""
    freed: dict[int, int] = {}
    for attempt, size in deleted:
        freed[attempt] = freed.get(attempt, 0) + size
    return freed


def report_counts(cases: Sequence[TestCase]) -> dict[str, int]:
    """A report's cases counted by result (every result present)."""
    by: dict[str, int] = dict.fromkeys(TEST_RESULTS, 0)
    for case in cases:
        by[case.result] += 1
    return by


def test_counts(passed: int, failed: int, error: int, skipped: int) -> TestCounts:
    return TestCounts(passed, failed, error, skipped, passed + failed + error + skipped)


def finished_minutes(
    ended: dict[int, tuple[int, int]], first_minute: float, minutes: int
) -> list[FinishedMinute]:
    """The overview's jobs ended per minute (`ended`: minute -> succeeded, failed)."""
    finished = []
    for i in range(minutes):
        minute = first_minute + 60 * i
        succeeded, failed = ended.get(int(minute), (0, 0))
        finished.append(FinishedMinute(minute, succeeded, failed))
    return finished


# --- the hardware lab ----------------------------------------------------------------

DEVICE_COLUMNS = (
    "id, class, supervisor_id, labels, console, power, health, health_reason, health_at,"
    " check_result, check_at, check_job, first_seen, last_declared"
)


def device_view(
    row: Row, holders: dict[str, str], checks: dict[str, str], reserved: dict[str, str]
) -> DeviceView:
    """A device from a row of DEVICE_COLUMNS, with the run holding it ("job#attempt"), its
    pending check job and the held reservation it belongs to, each by device id."""
    return DeviceView(
        id=row[0],
        class_=row[1],
        supervisor_id=row[2],
        labels=json.loads(row[3]),
        console=bool(row[4]),
        power=bool(row[5]),
        health=row[6],
        health_reason=row[7],
        health_at=row[8],
        check_result=row[9],
        check_at=row[10],
        check_job=row[11],
        holder=holders.get(row[0]),
        checking=checks.get(row[0]),
        reservation=reserved.get(row[0]),
        first_seen=row[12],
        last_declared=row[13],
    )


RESERVATION_COLUMNS = (
    "id, state, actor, owner, count, class, selector, priority, duration_s, created_at,"
    " refreshed_at, granted_at, expires_at, ended_at, end_reason"
)


def reservation_view(row: Row, devices: Iterable[Row]) -> ReservationView:
    """A reservation from a row of RESERVATION_COLUMNS and its (device id,) rows."""
    return ReservationView(
        id=row[0],
        state=row[1],
        actor=row[2],
        owner=row[3],
        count=row[4],
        class_=row[5],
        selector=_selector_decoder.decode(row[6]),
        priority=row[7],
        duration_s=row[8],
        created_at=row[9],
        refreshed_at=row[10],
        granted_at=row[11],
        expires_at=row[12],
        ended_at=row[13],
        end_reason=row[14],
        devices=[d for (d,) in devices],
    )


GROUP_COLUMNS = "id, name, created_at, priority, placed_at, ended_at, stop_reason, owner"


def group_view(
    row: Row,
    roles: Sequence[gangs.RoleState],
    details: Iterable[Row],
    device_rows: Iterable[Row],
) -> GroupView:
    """A group from a row of GROUP_COLUMNS, its roles' states, (job id, reason, supervisor
    id) of each role's job and (job id, device id) of their devices, in grant order."""
    about = {job_id: (reason, sup) for job_id, reason, sup in details}
    devices: dict[str, list[str]] = {}
    for job_id, device_id in device_rows:
        devices.setdefault(job_id, []).append(device_id)
    return GroupView(
        id=row[0],
        name=row[1],
        state=gangs.group_state(roles, row[6]),
        created_at=row[2],
        priority=row[3],
        placed_at=row[4],
        ended_at=row[5],
        reason=row[6],
        owner=row[7],
        roles=[
            GroupRoleView(
                role=r.role,
                job_id=r.job_id,
                essential=r.essential,
                phase=r.phase,
                reason=about.get(r.job_id, (None, None))[0],
                supervisor_id=about.get(r.job_id, (None, None))[1],
                devices=devices.get(r.job_id, []),
            )
            for r in roles
        ],
    )
