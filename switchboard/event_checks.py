"""Which of a supervisor's events the switchboard takes as sent, and what it says about the
others: the one home of those rules (docs/protocol.md §6.5). Pure: a store applying a batch
asks here, given what it has stored, and hands the problems back with its result; the
connection puts them in the Ack that covers them, counts and logs them.

Every event is acknowledged whatever happens to it: resending it would change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from protocol.exceptions import JobErrorKind, ProblemCode
from protocol.messages import (
    EventProblem,
    JobErrorReport,
    JobStateChanged,
    SupervisorEvent,
)
from protocol.state import SUPERVISOR_REPORTABLE, Phase, can_transition, is_terminal


def fresh_events(
    stored_seq: int, events: Sequence[SupervisorEvent], problems: list[EventProblem]
) -> Iterator[SupervisorEvent]:
    """The events of a batch to store, in order: those past `stored_seq` (the others are
    resends after a reconnect, stored already); a skipped number is noted in `problems`."""
    for event in events:
        if event.seq <= stored_seq:
            continue
        gap = seq_gap(stored_seq, event.seq)
        if gap is not None:
            problems.append(gap)
        stored_seq = event.seq
        yield event


def seq_gap(stored_seq: int, seq: int) -> EventProblem | None:
    """A new event (seq > stored_seq) whose number skips some: it is stored, and the
    events in between are named lost for good (they never arrived)."""
    if seq <= stored_seq + 1:
        return None
    missing = f"{stored_seq + 1}" if seq == stored_seq + 2 else f"{stored_seq + 1}..{seq - 1}"
    return EventProblem(
        seq,
        ProblemCode.SEQ_GAP,
        f"seq {seq} follows {stored_seq}: event(s) {missing} never arrived; stored anyway",
    )


def unknown_run(event: SupervisorEvent, exists: bool) -> EventProblem:
    """An event for a run not assigned to this supervisor (dropped; the run is stopped)."""
    what = "is assigned to another supervisor" if exists else "does not exist"
    return EventProblem(
        event.seq,
        ProblemCode.UNKNOWN_RUN,
        f"run {event.job_id}#{event.attempt} {what}: dropped, stop_job unwanted follows",
    )


def is_repeat_refusal(event: SupervisorEvent) -> bool:
    """The answer §6.4 prescribes to a start_job repeated after its run ended here (an
    `error job_already_exists`, then `state rejected`): expected, not a problem, and the
    run's record stands."""
    match event:
        case JobErrorReport(kind=JobErrorKind.JOB_ALREADY_EXISTS):
            return True
        case JobStateChanged(phase=Phase.REJECTED):
            return True
    return False


def after_end(event: SupervisorEvent, phase: Phase) -> EventProblem | None:
    """An event for a run already in terminal `phase`: None if it is still taken (the
    output and exit of a run ended `lost`, which the switchboard ended without hearing
    from its supervisor: what the program did still belongs to it), else the problem
    (dropped; a stop_job unwanted follows, in case the supervisor still holds the run)."""
    assert is_terminal(phase)
    if phase is Phase.LOST and not isinstance(event, JobStateChanged):
        return None
    return EventProblem(
        event.seq,
        ProblemCode.RUN_ENDED,
        f"run {event.job_id}#{event.attempt} already ended {phase.value}: dropped",
    )


def phase_change(event: JobStateChanged, phase: Phase) -> EventProblem | None:
    """A state event for an active run in `phase`: None if the change is allowed, else the
    problem (dropped; the run stays in `phase`)."""
    new = event.phase
    if new not in SUPERVISOR_REPORTABLE:
        return EventProblem(
            event.seq,
            ProblemCode.PHASE_NOT_REPORTABLE,
            f"only the switchboard decides {new.value}: dropped",
        )
    if not can_transition(phase, new):
        return EventProblem(
            event.seq,
            ProblemCode.INVALID_TRANSITION,
            f"run {event.job_id}#{event.attempt}: {phase.value} -> {new.value}"
            " is not allowed: dropped",
        )
    return None


def output_gap(seq: int, stored_length: int, offset: int) -> EventProblem:
    """Output that starts past what its stream has stored (dropped)."""
    return EventProblem(
        seq,
        ProblemCode.OUTPUT_GAP,
        f"offset {offset} is past the {stored_length} bytes stored for this stream: dropped",
    )


def output_capped(seq: int, cap: int, kept: int, of: int) -> EventProblem:
    """Output past the run's output cap: `kept` of `of` bytes stored."""
    return EventProblem(
        seq,
        ProblemCode.OUTPUT_CAPPED,
        f"the run reached its output cap of {cap} bytes: {kept} of {of} bytes stored",
    )
