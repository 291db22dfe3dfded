"""What happens to a job next: every restart, backoff, busy-retry, cancel and concurrency
decision, in one place. Pure functions of what they are given (the time among it), so a
store of any kind applies them without re-implementing any of them: it reads the facts a
function names, calls it, and writes the decision it gets back, in the same transaction.

The run's own phase rules (which phase may follow which) are protocol.state's; this module
decides what the *job* becomes when its run changes, is refused, is ended by the
switchboard, or when the job is submitted or canceled.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import msgspec

from protocol.exceptions import TRANSIENT_ERROR_KINDS, JobErrorKind
from protocol.spec import Backoff, Concurrency, RestartPolicy
from protocol.state import Phase, is_terminal

#: How long a job refused because its supervisor was busy waits before it is placed again
#: (not a restart: it never ran).
BUSY_RETRY_S = 0.5

#: Run endings after which each restart policy gives the job another run.
_RESTART_AFTER: dict[str, frozenset[Phase]] = {
    "never": frozenset(),
    "on_failure": frozenset({Phase.FAILED, Phase.TIMED_OUT, Phase.LOST}),
    "always": frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.TIMED_OUT, Phase.LOST}),
}

_NEVER = RestartPolicy()

Rand = Callable[[float, float], float]


class AuditEntry(msgspec.Struct, frozen=True):
    """One entry of a job's audit trail (its events), to be written with the change."""

    kind: str
    message: str
    at: float
    attempt: int | None = None
    actor: str | None = None


# --- restart backoff ---------------------------------------------------------------------


def restart_delay(
    backoff: Backoff, restart: int, previous_s: float | None = None, rand: Rand = random.uniform
) -> float:
    """Seconds to wait before restart number `restart` (1 for the first); the formulas are
    documented in protocol.spec.Backoff and docs/jobs.md."""
    try:
        grown = backoff.first_s * backoff.factor ** (restart - 1)
    except OverflowError:  # a large factor, many restarts: past any cap
        grown = math.inf if backoff.first_s else 0.0
    ceiling = min(backoff.max_s, grown)
    match backoff.jitter:
        case "none":
            return ceiling
        case "full":
            return rand(0.0, ceiling)
        case "equal":
            return ceiling / 2 + rand(0.0, ceiling / 2)
        case "decorrelated":
            previous = backoff.first_s if previous_s is None else previous_s
            return min(backoff.max_s, rand(backoff.first_s, max(backoff.first_s, 3 * previous)))
    raise ValueError(f"unknown jitter {backoff.jitter!r}")


# --- a run changes phase -----------------------------------------------------------------


class JobDecision(msgspec.Struct, frozen=True):
    """The job's phase once its current run is in some phase; `restart` says the job was
    queued again by its restart policy (which counts against `max_restarts`)."""

    phase: Phase
    restart: bool = False


def job_after_run(
    run_phase: Phase,
    *,
    error_kind: str | None,
    cancel_requested: bool,
    restart: RestartPolicy,
    restarts_done: int,
) -> JobDecision:
    """What the job becomes once its current run is in `run_phase`.

    While the run is active the job shows the run's phase. A run refused because the
    supervisor was busy sends the job back to the queue without counting as a restart.
    Otherwise the restart policy decides: another run while restarts remain, `exhausted`
    once they are used up (unless the run succeeded), else the run's ending is the job's.
    """
    if not is_terminal(run_phase):
        return JobDecision(run_phase)
    if cancel_requested:
        return JobDecision(Phase.CANCELED if run_phase != Phase.SUCCEEDED else run_phase)
    if run_phase == Phase.REJECTED and error_kind is not None:
        if JobErrorKind(error_kind) in TRANSIENT_ERROR_KINDS:
            return JobDecision(Phase.QUEUED)
    if run_phase in _RESTART_AFTER[restart.policy]:
        if restarts_done < restart.max_restarts:
            return JobDecision(Phase.QUEUED, restart=True)
        if run_phase != Phase.SUCCEEDED:
            return JobDecision(Phase.EXHAUSTED)
    return JobDecision(run_phase)


class JobAtRunChange(msgspec.Struct, frozen=True):
    """What the store holds of a job as one of its runs changes phase."""

    #: The job's latest attempt (a change of an older run leaves the job alone).
    attempts: int
    cancel_requested: bool
    #: Restarts used so far, and the backoff before the last of them.
    restarts: int
    backoff_s: float | None
    #: The job's restart policy; None: never restarted (or, for a change that does not
    #: end the run, not read: it is not needed then).
    restart: RestartPolicy | None = None


class RunChange(msgspec.Struct, frozen=True):
    """A run's new phase, with what its row holds that bears on the job."""

    attempt: int
    phase: Phase
    at: float
    #: The message that came with the change, and the run's recorded error (if any).
    message: str | None = None
    error_kind: str | None = None
    error: str | None = None


class JobUpdate(msgspec.Struct, frozen=True):
    """What to write to a job's row (and its audit trail) after its run changed."""

    phase: Phase
    #: None: the job keeps the reason it has.
    reason: str | None
    restarts: int
    backoff_s: float | None
    #: The job may not be placed before this time (epoch seconds; None: at once).
    not_before: float | None
    events: tuple[AuditEntry, ...] = ()


def after_run_change(
    run: RunChange, job: JobAtRunChange, rand: Rand = random.uniform
) -> JobUpdate | None:
    """The job's row once `run` reached its phase; None if the run is not the job's latest
    (the job has moved on: nothing to write)."""
    if run.attempt != job.attempts:
        return None
    terminal = is_terminal(run.phase)
    policy = job.restart or _NEVER
    decision = job_after_run(
        run.phase,
        error_kind=run.error_kind,
        cancel_requested=job.cancel_requested,
        restart=policy,
        restarts_done=job.restarts,
    )
    reason = (run.message or run.error) if terminal else None
    restarts, backoff_s, not_before = job.restarts, job.backoff_s, None
    events: tuple[AuditEntry, ...] = ()
    if decision.restart:
        restarts += 1
        backoff_s = restart_delay(policy.backoff, restarts, backoff_s, rand)
        not_before = run.at + backoff_s
        reason = f"restart {restarts} of {policy.max_restarts} in {backoff_s:.2f}s: {reason}"
        events = (AuditEntry("restart_scheduled", reason, run.at, run.attempt),)
    elif decision.phase == Phase.QUEUED:
        not_before = run.at + BUSY_RETRY_S  # refused as busy: don't hammer the same supervisor
    elif decision.phase == Phase.EXHAUSTED:
        events = (AuditEntry("exhausted", f"{restarts} restarts used up", run.at, run.attempt),)
    return JobUpdate(decision.phase, reason, restarts, backoff_s, not_before, events)


# --- endings the switchboard decides -------------------------------------------------------

#: A run the switchboard ends because it outlived its timeout (the supervisor did not end it).
RUN_TIMEOUT_MESSAGE = "run timeout enforced by the switchboard (the supervisor did not end it)"


def run_timed_out(attempt: int, at: float) -> AuditEntry:
    """The audit entry of a run the switchboard timed out (the run then ends `timed_out`)."""
    return AuditEntry("run_timeout", RUN_TIMEOUT_MESSAGE, at, attempt)


def lost_message(grace_s: float) -> str:
    """Why the runs of a supervisor silent past its grace end `lost`."""
    return f"supervisor silent for over {grace_s:g}s"


class JobEnd(msgspec.Struct, frozen=True):
    """A queued job ended by the switchboard before any run: its phase, reason and audit
    entry."""

    phase: Phase
    reason: str
    event: AuditEntry


def queue_timed_out(now: float) -> JobEnd:
    """A job that waited past its queue timeout."""
    return JobEnd(
        Phase.TIMED_OUT,
        "queue timeout: no supervisor took the job in time",
        AuditEntry("queue_timeout", "waited past its queue timeout", now),
    )


def secrets_unreadable(why: str, now: float) -> JobEnd:
    """A queued job whose secret values can't be opened: never started, since nothing is
    sent without them nor with anything in their place."""
    reason = f"not started: {why}"
    return JobEnd(Phase.REJECTED, reason, AuditEntry("secrets_unreadable", reason, now))


def inputs_unavailable(why: str, now: float) -> JobEnd:
    """A queued job whose inputs name an earlier job's output that never came (see
    switchboard.chains): it can never run as written."""
    reason = f"not started: {why}"
    return JobEnd(Phase.REJECTED, reason, AuditEntry("inputs_unavailable", reason, now))


# --- cancel --------------------------------------------------------------------------------


class CancelDecision(msgspec.Struct, frozen=True):
    """What a cancel does to a job: its phase after it, its reason, and whether a run is
    to be stopped (the job ends once it has)."""

    phase: Phase
    reason: str
    stop_run: bool
    event: AuditEntry


def on_cancel(phase: Phase, why: str, actor: str, now: float) -> CancelDecision | None:
    """Cancel a job in `phase`: a queued one ends at once, an active one keeps its phase
    until its run is stopped; None if it has already ended."""
    if is_terminal(phase):
        return None
    event = AuditEntry("cancel_requested", why, now, actor=actor)
    if phase == Phase.QUEUED:
        return CancelDecision(Phase.CANCELED, f"{why} while queued", False, event)
    return CancelDecision(phase, why, True, event)


def may_delete(phase: Phase, has_active_run: bool) -> bool:
    """A job may be deleted (with its runs, output and history) once it has ended and no
    run of it is still held: deleting earlier would forget a run a supervisor still has."""
    return is_terminal(phase) and not has_active_run


# --- submission ------------------------------------------------------------------------------


class SubmitDecision(msgspec.Struct, frozen=True):
    """What a new job starts as: queued, or rejected at once by its concurrency policy;
    `replaces` are the jobs to cancel for it (policy `replace`)."""

    phase: Phase
    reason: str | None
    #: When the job ends `timed_out` if no supervisor took it (None: never).
    queue_deadline: float | None
    #: Whether its secret values are kept (a job that will never run needs none).
    keep_secrets: bool
    replaces: tuple[str, ...]
    events: tuple[AuditEntry, ...]


def on_submit(
    name: str,
    concurrency: Concurrency | None,
    holders: Sequence[str],
    queue_timeout_s: float | None,
    actor: str,
    now: float,
) -> SubmitDecision:
    """Decide a new job's start. `holders`: the jobs, oldest first, that hold its
    concurrency key (queued or running); `queue` waits its turn behind them,
    `drop_if_running` is rejected while there are any, `replace` cancels them."""
    submitted = AuditEntry("submitted", f"submitted as {name!r}", now, actor=actor)
    policy = concurrency.policy if concurrency is not None and holders else "queue"
    if policy == "drop_if_running":
        assert concurrency is not None
        reason = f"dropped: concurrency key {concurrency.key!r} is held by job {holders[0]}"
        dropped = AuditEntry("dropped", reason, now)
        return SubmitDecision(Phase.REJECTED, reason, None, False, (), (submitted, dropped))
    replaces = tuple(holders) if policy == "replace" else ()
    events = (submitted, *(AuditEntry("replaced", f"replaces job {h}", now) for h in replaces))
    deadline = now + queue_timeout_s if queue_timeout_s else None
    return SubmitDecision(Phase.QUEUED, None, deadline, True, replaces, events)


def replaced_by(job_id: str) -> str:
    """Why a job replaced by `job_id` is canceled."""
    return f"replaced by job {job_id}"
