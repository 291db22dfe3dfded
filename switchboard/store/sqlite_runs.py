"""Run phase changes and supervisor events, applied inside the writer's transaction.

A batch of a supervisor's events often holds several phase changes of one run (a short
job: initializing, running, exit, succeeded). Each is recorded in the run's history as it
comes, but the run's row and its job's row take only the last one: a phase that a later
one in the same transaction replaces was never visible to anyone, so writing it to the
row and the job (with the job change log behind it) would be work for nothing. The
writer is the switchboard's busiest thread; this is most of what it does per job.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from protocol.messages import (
    EventProblem,
    JobErrorReport,
    JobExit,
    JobFiles,
    JobStateChanged,
    Output,
    RunRef,
    SupervisorEvent,
)
from protocol.spec import RestartPolicy
from protocol.state import Phase, can_transition, is_terminal
from switchboard import event_checks as checks
from switchboard import lifecycle, metrics
from switchboard.models import PendingReport, RunOnSupervisor
from switchboard.store import sqlite_files
from switchboard.store.schema import ACTIVE_PHASES, ACTIVE_SQL
from switchboard.store.sqlite_files import FilesStored
from switchboard.store.sqlite_jobs import record_events
from switchboard.store.sqlite_output import OUTPUT_CUT_NOTE, stored_length

log = logging.getLogger("switchboard.store")

#: set_run_phase's default: the job takes the run's stored exit code.
FROM_RUN = object()


def record_phase(
    conn: sqlite3.Connection,
    job_id: str,
    attempt: int,
    phase: Phase,
    stage: str | None,
    message: str | None,
    at: float,
) -> None:
    conn.execute(
        "INSERT INTO run_phases (job_id, attempt, phase, stage, message, at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, attempt, phase.value, stage, message, at),
    )


class _BackendKind(msgspec.Struct):
    kind: str = ""


class _SpecFacts(msgspec.Struct):
    """What a phase change reads of a stored spec: the backend kind (a metric label) and
    the restart policy (the lifecycle's); the rest is skipped, not decoded."""

    backend: _BackendKind = msgspec.field(default_factory=_BackendKind)
    restart: RestartPolicy | None = None


_facts_decoder = msgspec.json.Decoder(_SpecFacts)


def observe_run(
    phase: Phase,
    at: float,
    spec: bytes,
    times: tuple[float, float | None, float, float | None, float | None],
    started_at: float | None,
) -> _SpecFacts | None:
    """Stage the metrics of a run reaching running (dispatch latency) or its end (duration);
    they count once the transaction commits. `times`: the run's created_at and started_at,
    the job's queued_at and not_before, and when the attempt before ended; `started_at`:
    when a replaced change reached running. Returns what the spec says for them (None: the
    change needs nothing of it: it neither starts nor ends the run)."""
    terminal = is_terminal(phase)
    if phase != Phase.RUNNING and not terminal and started_at is None:
        return None
    try:
        facts = _facts_decoder.decode(spec)
    except msgspec.DecodeError:  # a metric label must never cost the change itself
        facts = _SpecFacts()
    kind = facts.backend.kind
    created_at, run_started_at, queued_at, not_before, previous_ended = times
    if phase == Phase.RUNNING or started_at is not None:
        # Queued for this attempt: when the job was submitted, or when the attempt before
        # ended (requeued), or when its restart backoff ended, whichever is latest. The
        # switchboard's clock: the supervisor's `at` may be skewed.
        queued = max(queued_at, previous_ended or 0.0, not_before or 0.0)
        metrics.run_running(kind, time.time() - queued)
    if terminal:
        metrics.run_ended(kind, phase, at - (run_started_at or created_at))
    return facts


#: All a phase change needs of its run and job, in one read (the writer's busiest path);
#: the caller adds which run.
CHANGE_FACTS = (
    "SELECT j.attempts, j.cancel_requested, j.restarts, j.backoff_s, j.spec,"
    " r.error_kind, r.exit_code, r.error,"
    " r.created_at, r.started_at, j.queued_at, j.not_before,"
    " (SELECT ended_at FROM runs p WHERE p.job_id = r.job_id AND p.attempt = r.attempt - 1)"
    " FROM runs r JOIN jobs j ON j.id = r.job_id"
)


def after_change(
    row: Sequence[Any],
    attempt: int,
    phase: Phase,
    message: str | None,
    at: float,
    started_at: float | None,
) -> lifecycle.JobUpdate | None:
    """What the job becomes after its run's change (a row of CHANGE_FACTS), as
    switchboard.lifecycle decides; the run's metrics staged."""
    attempts, cancel_requested, restarts, backoff_s, spec_json = row[:5]
    error_kind, error = row[5], row[7]
    spec = observe_run(phase, at, spec_json, tuple(row[8:13]), started_at)
    return lifecycle.after_run_change(
        lifecycle.RunChange(attempt, phase, at, message, error_kind, error),
        lifecycle.JobAtRunChange(
            attempts, bool(cancel_requested), restarts, backoff_s, spec.restart if spec else None
        ),
    )


def set_run_phase(
    conn: sqlite3.Connection,
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
    decides. For a change EventBatch held back: `started_at`, when the run reached
    running if a replaced change was that, and `exit_code`, the run's exit code when the
    change came (the job shows it), and `run_message` False: the change's message was
    written to the run when it came."""
    if phase == Phase.RUNNING:
        started_at = at
    conn.execute(
        "UPDATE runs SET phase = ?, stage = ?, message = coalesce(?, message),"
        " started_at = coalesce(?, started_at),"
        " ended_at = CASE WHEN ? THEN ? ELSE ended_at END"
        " WHERE job_id = ? AND attempt = ?",
        (
            phase.value,
            stage,
            message if run_message else None,
            started_at,
            is_terminal(phase),
            at,
            job_id,
            attempt,
        ),
    )
    record_phase(conn, job_id, attempt, phase, stage, message, at)
    # All this change needs of the run and its job, in one read (this is the writer's
    # busiest path).
    row = conn.execute(
        CHANGE_FACTS + " WHERE r.job_id = ? AND r.attempt = ?", (job_id, attempt)
    ).fetchone()
    if row is None:
        return
    update = after_change(row, attempt, phase, message, at, started_at)
    if update is None:
        return
    run_exit_code = row[6]
    record_events(conn, job_id, update.events)
    conn.execute(
        "UPDATE jobs SET phase = ?, exit_code = ?, reason = coalesce(?, reason), updated_at = ?,"
        " restarts = ?, backoff_s = ?, not_before = ? WHERE id = ?",
        (
            update.phase.value,
            run_exit_code if exit_code is FROM_RUN else exit_code,
            update.reason,
            time.time(),
            update.restarts,
            update.backoff_s,
            update.not_before,
            job_id,
        ),
    )


@dataclass
class RunState:
    """A run as this batch has left it so far."""

    phase: Phase
    supervisor_id: str
    exit_code: int | None
    #: Bytes of output stored, all streams; the streams cut at the cap.
    output_bytes: int
    truncated: list[str]
    #: Output stored in this batch: the row's two output columns need writing.
    output_changed: bool = False


@dataclass
class PendingChange:
    """A run's latest phase change in this batch, not yet written to its row and job."""

    event: JobStateChanged
    at: float
    #: The run's exit code when the change came.
    exit_code: int | None
    #: When the run reached running, if a change this one replaced was that.
    started_at: float | None = None


def next_change(
    replaced: PendingChange | None, event: JobStateChanged, run: RunState
) -> PendingChange:
    """A run's phase change held back in its batch; `replaced`: the one it replaces."""
    started_at = None
    if replaced is not None:
        change = replaced.event
        started_at = replaced.at if change.phase == Phase.RUNNING else replaced.started_at
    return PendingChange(event, event.at or time.time(), run.exit_code, started_at)


class BatchLog(Protocol):
    """What an event batch collects as it goes (EventBatch; the PostgreSQL store's too)."""

    supervisor_id: str
    output_cap: int | None
    problems: list[EventProblem]
    unwanted: list[RunRef]


def admit(batch: BatchLog, run: RunState | None, event: SupervisorEvent) -> bool:
    """Whether `event` is to be applied to `run` (None: no such run); if not, the problem
    is noted and, where the supervisor may still hold the run, it is marked unwanted."""
    key = RunRef(event.job_id, event.attempt)
    if run is None or run.supervisor_id != batch.supervisor_id:
        batch.problems.append(checks.unknown_run(event, exists=run is not None))
        batch.unwanted.append(key)
        return False
    if is_terminal(run.phase):
        if checks.is_repeat_refusal(event):
            return False  # the answer to a StartJob repeated after the end: the record stands
        problem = checks.after_end(event, run.phase)
        if problem is not None:
            # A supervisor still reporting on it may still hold it: stop it there.
            batch.problems.append(problem)
            batch.unwanted.append(key)
            return False
    return True


def dropped(batch: BatchLog, event: Output) -> None:
    """Output of a stream already cut at the cap: dropped, and said so."""
    assert batch.output_cap is not None
    metrics.output_dropped(event.stream, len(event.data))
    batch.problems.append(checks.output_capped(event.seq, batch.output_cap, 0, len(event.data)))


def new_output(
    batch: BatchLog, run: RunState, event: Output, length: int
) -> tuple[int, bytes] | None:
    """What of `event` to store (offset, bytes), given the `length` its stream has stored
    and the run's cap (the run's counts are updated as if stored); None: nothing."""
    cap = batch.output_cap
    if event.offset > length:
        batch.problems.append(checks.output_gap(event.seq, length, event.offset))
        return None
    if event.offset + len(event.data) <= length:
        return None  # sent again (a re-adopted run replays its output from the start)
    # Only what is new: a chunk sent again may overlap what is stored.
    offset, data = length, event.data[length - event.offset :]
    if cap is not None and run.output_bytes + len(data) > cap:
        # The cap is crossed: keep what fits, then say where and why the stream stops.
        kept = data[: max(cap - run.output_bytes, 0)]
        metrics.output_truncated(event.stream, len(data) - len(kept))
        batch.problems.append(checks.output_capped(event.seq, cap, len(kept), len(data)))
        data = kept + OUTPUT_CUT_NOTE.format(cap=cap).encode()
        run.truncated.append(event.stream)
    run.output_bytes += len(data)
    run.output_changed = True
    return offset, data


def run_state(row: Sequence[Any] | None) -> RunState | None:
    """A run as a batch finds it, from its (phase, supervisor_id, exit_code, output_bytes,
    output_truncated); None: no such run."""
    if row is None:
        return None
    return RunState(Phase(row[0]), row[1], row[2], row[3], row[4].split(",") if row[4] else [])


def count_files(batch: BatchLog, event: JobFiles, stored: FilesStored) -> None:
    """Count and log what storing a `files` event kept and refused."""
    metrics.OUTPUT_FILES.labels("kept").inc(stored.kept)
    metrics.OUTPUT_FILES.labels("refused").inc(stored.refused)
    if stored.invalid:
        metrics.OUTPUT_FILES.labels("invalid_path").inc(len(stored.invalid))
        log.warning(
            "run %s#%d of supervisor %s listed %d output file(s) under a path that is"
            " not relative, not kept: %r",
            event.job_id,
            event.attempt,
            batch.supervisor_id,
            len(stored.invalid),
            stored.invalid[:5],
        )
    if stored.not_uploaded:
        # Not a wire problem (no code says it): the run shows it with its files.
        metrics.OUTPUT_FILES.labels("not_uploaded").inc(len(stored.not_uploaded))
        log.warning(
            "run %s#%d of supervisor %s listed %d output file(s) never uploaded, not kept: %s",
            event.job_id,
            event.attempt,
            batch.supervisor_id,
            len(stored.not_uploaded),
            ", ".join(stored.not_uploaded[:5]),
        )


class EventBatch:
    """Applies one supervisor's new events, in order, within the writer's transaction;
    `finish` writes the phase changes still pending. Collects the runs that ended and
    those the switchboard no longer wants.

    A run stores at most `output_cap` bytes of output, all streams together (None: no
    cap). The chunk that crosses it is cut there and the stream gets OUTPUT_CUT_NOTE; what
    that stream sends afterwards is dropped (still acknowledged, like every stored event:
    resending it would change nothing). The run keeps its real outcome; its
    `output_truncated` names the streams cut."""

    def __init__(
        self, conn: sqlite3.Connection, supervisor_id: str, output_cap: int | None = None
    ) -> None:
        self.conn = conn
        self.supervisor_id = supervisor_id
        self.output_cap = output_cap
        self.ended: list[RunRef] = []
        self.unwanted: list[RunRef] = []
        #: What went wrong with events of this batch (switchboard.event_checks).
        self.problems: list[EventProblem] = []
        #: (job id, attempt) -> the run as of this batch; None: no such run.
        self._runs: dict[tuple[str, int], RunState | None] = {}
        self._pending: dict[tuple[str, int], PendingChange] = {}
        #: Test reports among the files this batch kept, to parse once it is stored.
        self.reports: list[PendingReport] = []

    def apply(self, event: SupervisorEvent) -> None:
        key = (event.job_id, event.attempt)
        if key not in self._runs:
            self._runs[key] = run_state(
                self.conn.execute(
                    "SELECT phase, supervisor_id, exit_code, output_bytes, output_truncated"
                    " FROM runs WHERE job_id = ? AND attempt = ?",
                    key,
                ).fetchone()
            )
        run = self._runs[key]
        if not admit(self, run, event):
            return
        assert run is not None
        phase = run.phase
        conn = self.conn
        match event:
            case Output():
                self._output(run, event)
            case JobErrorReport(kind=kind, description=description):
                conn.execute(
                    "UPDATE runs SET error_kind = ?, error = ? WHERE job_id = ? AND attempt = ?",
                    (kind.value, description, *key),
                )
            case JobExit():
                run.exit_code = event.exit_code
                conn.execute(
                    "UPDATE runs SET exit_code = ?, signal = ?, reason = ?,"
                    " message = coalesce(?, message) WHERE job_id = ? AND attempt = ?",
                    (event.exit_code, event.signal, event.reason, event.message, *key),
                )
            case JobFiles():
                self._files(event)
            case JobStateChanged():
                problem = checks.phase_change(event, phase)
                if problem is not None:
                    self.problems.append(problem)
                    return
                run.phase = event.phase
                self._change(key, event, run)

    def _change(self, key: tuple[str, int], event: JobStateChanged, run: RunState) -> None:
        replaced = self._pending.pop(key, None)
        if replaced is not None:
            # Replaced before anyone could see it: into the history only.
            change = replaced.event
            record_phase(self.conn, *key, change.phase, change.stage, change.message, replaced.at)
        pending = next_change(replaced, event, run)
        if is_terminal(event.phase):
            self._write(key, pending, run_message=True)  # nothing follows a terminal phase
            self.ended.append(RunRef(*key))
            return
        if event.message is not None:
            # The run's message keeps the order of events (an exit after this may bring
            # its own): written now, not with the change.
            self.conn.execute(
                "UPDATE runs SET message = ? WHERE job_id = ? AND attempt = ?",
                (event.message, *key),
            )
        self._pending[key] = pending

    def finish(self) -> None:
        for key, pending in self._pending.items():
            self._write(key, pending, run_message=False)
        self._pending.clear()
        for key, run in self._runs.items():
            if run is not None and run.output_changed:
                self.conn.execute(
                    "UPDATE runs SET output_bytes = ?, output_truncated = ?"
                    " WHERE job_id = ? AND attempt = ?",
                    (run.output_bytes, ",".join(run.truncated) or None, *key),
                )
                run.output_changed = False

    def _files(self, event: JobFiles) -> None:
        junit = sqlite_files.report_globs(self.conn, event.job_id)
        stored = sqlite_files.store_files(self.conn, event, junit)
        self.reports += stored.reports
        count_files(self, event, stored)

    def _output(self, run: RunState, event: Output) -> None:
        if event.stream in run.truncated:
            dropped(self, event)
            return
        chunk = new_output(self, run, event, stored_length(self.conn, event))
        if chunk is None:
            return
        offset, data = chunk
        self.conn.execute(
            "INSERT INTO output (job_id, attempt, stream, offset, data) VALUES (?, ?, ?, ?, ?)",
            (event.job_id, event.attempt, event.stream, offset, data),
        )

    def _write(self, key: tuple[str, int], pending: PendingChange, *, run_message: bool) -> None:
        change = pending.event
        set_run_phase(
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


def lose_runs(conn: sqlite3.Connection, grace_s: float, now: float) -> list[RunRef]:
    """End as `lost` every active run of a supervisor disconnected for over `grace_s`."""
    rows = conn.execute(
        "SELECT r.job_id, r.attempt FROM runs r JOIN supervisors s"
        " ON s.id = r.supervisor_id WHERE s.connected = 0 AND s.last_seen < ?"
        f" AND r.phase IN ({ACTIVE_SQL})",
        (now - grace_s, *ACTIVE_PHASES),
    ).fetchall()
    message = lifecycle.lost_message(grace_s)
    for job_id, attempt in rows:
        set_run_phase(conn, job_id, attempt, Phase.LOST, None, message, now)
    return [RunRef(job_id, attempt) for job_id, attempt in rows]


def expire_runs(conn: sqlite3.Connection, grace_s: float, now: float) -> list[RunOnSupervisor]:
    """End as `timed_out` every run active for its timeout plus `grace_s` (the supervisor's
    chance to report it): running for it, or assigned for it if it never got to running."""
    rows = conn.execute(
        "SELECT r.job_id, r.attempt, r.supervisor_id FROM runs r"
        " JOIN jobs j ON j.id = r.job_id"
        f" WHERE r.phase IN ({ACTIVE_SQL}) AND j.timeout_s IS NOT NULL"
        " AND coalesce(r.started_at, r.created_at) + j.timeout_s + ? <= ?",
        (*ACTIVE_PHASES, grace_s, now),
    ).fetchall()
    runs = []
    for job_id, attempt, supervisor_id in rows:
        event = lifecycle.run_timed_out(attempt, now)
        set_run_phase(conn, job_id, attempt, Phase.TIMED_OUT, None, event.message, now)
        record_events(conn, job_id, [event])
        runs.append(RunOnSupervisor(job_id, attempt, supervisor_id))
    return runs


def end_run(conn: sqlite3.Connection, key: RunRef, phase: Phase, message: str) -> bool:
    """End an active run from the switchboard's side; False if it may not end so."""
    current = run_phase(conn, key.job_id, key.attempt)
    if current is None or not can_transition(current, phase):
        return False
    set_run_phase(conn, key.job_id, key.attempt, phase, None, message, time.time())
    return True


def run_phase(conn: sqlite3.Connection, job_id: str, attempt: int) -> Phase | None:
    row = conn.execute(
        "SELECT phase FROM runs WHERE job_id = ? AND attempt = ?", (job_id, attempt)
    ).fetchone()
    return Phase(row[0]) if row else None
