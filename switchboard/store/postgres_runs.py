"""Run phase changes, supervisor events and console output in the PostgreSQL store
(sqlite_runs.py's and sqlite_output.py's SQL, translated). The rules of a batch (which
events are applied, what of a chunk is stored, which change is held back, what the job
becomes) are sqlite_runs' functions, shared; this module only reads and writes.
"""

from __future__ import annotations

import time

from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.messages import (
    EventProblem,
    JobErrorReport,
    JobExit,
    JobFiles,
    JobStateChanged,
    Output,
    RunRef,
    Stream,
    SupervisorEvent,
)
from protocol.state import Phase, can_transition, is_terminal
from switchboard import event_checks as checks
from switchboard import lifecycle
from switchboard.models import PendingReport, RunOnSupervisor
from switchboard.store import postgres_files, records
from switchboard.store.postgres_engine import Connection
from switchboard.store.postgres_jobs import record_events
from switchboard.store.schema import ACTIVE_LITERALS
from switchboard.store.sqlite_runs import (
    CHANGE_FACTS,
    FROM_RUN,
    PendingChange,
    RunState,
    admit,
    after_change,
    count_files,
    dropped,
    new_output,
    next_change,
    run_state,
)


async def record_phase(
    conn: Connection,
    job_id: str,
    attempt: int,
    phase: Phase,
    stage: str | None,
    message: str | None,
    at: float,
) -> None:
    await conn.execute(
        "INSERT INTO run_phases (job_id, attempt, phase, stage, message, at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        job_id,
        attempt,
        phase.value,
        stage,
        message,
        at,
    )


async def set_run_phase(
    conn: Connection,
    job_id: str,
    attempt: int,
    phase: Phase,
    stage: str | None,
    message: str | None,
    at: float,
    *,
    started_at: float | None = None,
    exit_code: int | object | None = FROM_RUN,
    run_message: bool = True,
) -> None:
    """Move a run (already checked) to `phase`, and its job to what switchboard.lifecycle
    decides (sqlite_runs.set_run_phase)."""
    if phase == Phase.RUNNING:
        started_at = at
    # One round trip: the run's change, its history row, and what the job's rules need
    # (the job's row locked). The facts are read from the snapshot before the change,
    # which changes none of them but the run's start, made good below.
    row = await conn.fetchrow(
        "WITH changed AS (UPDATE runs SET phase = $1, stage = $2,"
        " message = coalesce($3, message), started_at = coalesce($4, started_at),"
        " ended_at = CASE WHEN $5 THEN $6 ELSE ended_at END"
        " WHERE job_id = $7 AND attempt = $8),"
        " recorded AS (INSERT INTO run_phases (job_id, attempt, phase, stage, message, at)"
        " VALUES ($7, $8, $1, $2, $9, $6)) "
        + CHANGE_FACTS
        + " WHERE r.job_id = $7 AND r.attempt = $8 FOR UPDATE OF j",
        phase.value,
        stage,
        message if run_message else None,
        started_at,
        is_terminal(phase),
        at,
        job_id,
        attempt,
        message,
    )
    if row is None:
        return
    if started_at is not None:  # the run's start as the change wrote it
        row = (*row[:9], started_at, *row[10:])
    update = after_change(row, attempt, phase, message, at, started_at)
    if update is None:
        return
    await record_events(conn, job_id, update.events)
    await conn.execute(
        "UPDATE jobs SET phase = $1, exit_code = $2, reason = coalesce($3, reason),"
        " updated_at = $4, restarts = $5, backoff_s = $6, not_before = $7 WHERE id = $8",
        update.phase.value,
        row[6] if exit_code is FROM_RUN else exit_code,
        update.reason,
        time.time(),
        update.restarts,
        update.backoff_s,
        update.not_before,
        job_id,
    )


async def stored_length(conn: Connection, event: Output) -> int:
    """How many bytes the stream `event` continues has stored (its last chunk's end)."""
    last = await conn.fetchval(
        'SELECT "offset" + octet_length(data) FROM output'
        ' WHERE job_id = $1 AND attempt = $2 AND stream = $3 ORDER BY "offset" DESC LIMIT 1',
        event.job_id,
        event.attempt,
        event.stream,
    )
    return int(last) if last is not None else 0


async def read_output(
    conn: Connection, job_id: str, attempt: int, stream: Stream, start: int, end: int | None
) -> bytes:
    """Bytes [start, end) of a run's stream (as much as is stored)."""
    stop = end if end is not None else 1 << 62
    rows = await conn.fetch(
        'SELECT "offset", data FROM output WHERE job_id = $1 AND attempt = $2 AND stream = $3'
        ' AND "offset" < $4 AND "offset" > $5 AND "offset" + octet_length(data) > $6'
        ' ORDER BY "offset"',
        # No stored chunk is longer than MAX_OUTPUT_CHUNK: a lower bound for the index.
        job_id,
        attempt,
        stream,
        stop,
        start - MAX_OUTPUT_CHUNK - 1,
        start,
    )
    return records.output_range(rows, start, stop)


class EventBatch:
    """sqlite_runs.EventBatch on PostgreSQL: one supervisor's new events applied in order
    in the caller's transaction; `finish` writes the phase changes still pending."""

    def __init__(self, conn: Connection, supervisor_id: str, output_cap: int | None) -> None:
        self.conn = conn
        self.supervisor_id = supervisor_id
        self.output_cap = output_cap
        self.ended: list[RunRef] = []
        self.unwanted: list[RunRef] = []
        self.problems: list[EventProblem] = []
        self._runs: dict[tuple[str, int], RunState | None] = {}
        self._pending: dict[tuple[str, int], PendingChange] = {}
        self.reports: list[PendingReport] = []

    async def apply(self, event: SupervisorEvent) -> None:
        key = (event.job_id, event.attempt)
        if key not in self._runs:
            self._runs[key] = run_state(
                await self.conn.fetchrow(
                    "SELECT phase, supervisor_id, exit_code, output_bytes, output_truncated"
                    " FROM runs WHERE job_id = $1 AND attempt = $2 FOR UPDATE",
                    *key,
                )
            )
        run = self._runs[key]
        if not admit(self, run, event):
            return
        assert run is not None
        conn = self.conn
        match event:
            case Output():
                if event.stream in run.truncated:
                    dropped(self, event)
                    return
                chunk = new_output(self, run, event, await stored_length(conn, event))
                if chunk is not None:
                    await conn.execute(
                        'INSERT INTO output (job_id, attempt, stream, "offset", data)'
                        " VALUES ($1, $2, $3, $4, $5)",
                        *key,
                        event.stream,
                        *chunk,
                    )
            case JobErrorReport(kind=kind, description=description):
                await conn.execute(
                    "UPDATE runs SET error_kind = $1, error = $2"
                    " WHERE job_id = $3 AND attempt = $4",
                    kind.value,
                    description,
                    *key,
                )
            case JobExit():
                run.exit_code = event.exit_code
                await conn.execute(
                    "UPDATE runs SET exit_code = $1, signal = $2, reason = $3,"
                    " message = coalesce($4, message) WHERE job_id = $5 AND attempt = $6",
                    event.exit_code,
                    event.signal,
                    event.reason,
                    event.message,
                    *key,
                )
            case JobFiles():
                junit = await postgres_files.report_globs(conn, event.job_id)
                stored = await postgres_files.store_files(conn, event, junit)
                self.reports += stored.reports
                count_files(self, event, stored)
            case JobStateChanged():
                problem = checks.phase_change(event, run.phase)
                if problem is not None:
                    self.problems.append(problem)
                    return
                run.phase = event.phase
                await self._change(key, event, run)

    async def _change(self, key: tuple[str, int], event: JobStateChanged, run: RunState) -> None:
        replaced = self._pending.pop(key, None)
        if replaced is not None:
            # Replaced before anyone could see it: into the history only.
            change = replaced.event
            await record_phase(
                self.conn, *key, change.phase, change.stage, change.message, replaced.at
            )
        pending = next_change(replaced, event, run)
        if is_terminal(event.phase):
            await self._write(key, pending, run_message=True)  # nothing follows an end
            self.ended.append(RunRef(*key))
            return
        if event.message is not None:
            await self.conn.execute(
                "UPDATE runs SET message = $1 WHERE job_id = $2 AND attempt = $3",
                event.message,
                *key,
            )
        self._pending[key] = pending

    async def finish(self) -> None:
        for key, pending in self._pending.items():
            await self._write(key, pending, run_message=False)
        self._pending.clear()
        for key, run in self._runs.items():
            if run is not None and run.output_changed:
                await self.conn.execute(
                    "UPDATE runs SET output_bytes = $1, output_truncated = $2"
                    " WHERE job_id = $3 AND attempt = $4",
                    run.output_bytes,
                    ",".join(run.truncated) or None,
                    *key,
                )
                run.output_changed = False

    async def _write(
        self, key: tuple[str, int], pending: PendingChange, *, run_message: bool
    ) -> None:
        change = pending.event
        await set_run_phase(
            self.conn,
            *key,
            change.phase,
            change.stage,
            change.message,
            pending.at,
            started_at=pending.started_at,
            exit_code=pending.exit_code,
            run_message=run_message,
        )


async def lose_runs(conn: Connection, grace_s: float, now: float) -> list[RunRef]:
    """End as `lost` every active run of a supervisor disconnected for over `grace_s`
    (one another writer holds is left to the next pass)."""
    rows = await conn.fetch(
        "SELECT r.job_id, r.attempt FROM runs r JOIN supervisors s"
        " ON s.id = r.supervisor_id WHERE s.connected = 0 AND s.last_seen < $1"
        f" AND r.phase IN ({ACTIVE_LITERALS}) FOR UPDATE OF r SKIP LOCKED",
        now - grace_s,
    )
    message = lifecycle.lost_message(grace_s)
    for job_id, attempt in rows:
        await set_run_phase(conn, job_id, attempt, Phase.LOST, None, message, now)
    return [RunRef(job_id, attempt) for job_id, attempt in rows]


async def expire_runs(conn: Connection, grace_s: float, now: float) -> list[RunOnSupervisor]:
    """End as `timed_out` every run active for its timeout plus `grace_s`."""
    rows = await conn.fetch(
        "SELECT r.job_id, r.attempt, r.supervisor_id FROM runs r"
        " JOIN jobs j ON j.id = r.job_id"
        f" WHERE r.phase IN ({ACTIVE_LITERALS}) AND j.timeout_s IS NOT NULL"
        " AND coalesce(r.started_at, r.created_at) + j.timeout_s + $1 <= $2"
        " FOR UPDATE OF r SKIP LOCKED",
        grace_s,
        now,
    )
    runs = []
    for job_id, attempt, supervisor_id in rows:
        event = lifecycle.run_timed_out(attempt, now)
        await set_run_phase(conn, job_id, attempt, Phase.TIMED_OUT, None, event.message, now)
        await record_events(conn, job_id, [event])
        runs.append(RunOnSupervisor(job_id, attempt, supervisor_id))
    return runs


async def end_run(conn: Connection, key: RunRef, phase: Phase, message: str) -> bool:
    """End an active run from the switchboard's side; False if it may not end so."""
    current = await conn.fetchval(
        "SELECT phase FROM runs WHERE job_id = $1 AND attempt = $2 FOR UPDATE",
        key.job_id,
        key.attempt,
    )
    if current is None or not can_transition(Phase(current), phase):
        return False
    await set_run_phase(conn, key.job_id, key.attempt, phase, None, message, time.time())
    return True


async def run_phase(conn: Connection, job_id: str, attempt: int) -> Phase | None:
    phase = await conn.fetchval(
        "SELECT phase FROM runs WHERE job_id = $1 AND attempt = $2", job_id, attempt
    )
    return Phase(phase) if phase is not None else None
