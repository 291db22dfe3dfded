"""What a run's ending means for its job. Pure functions; the store applies them.

Restart policies (later) plug in here: this module alone decides whether a job gets
another run.
"""

from __future__ import annotations

import msgspec

from protocol.exceptions import TRANSIENT_ERROR_KINDS, JobErrorKind
from protocol.spec import JobSpec, Parameter, RestartPolicy
from protocol.state import Phase, is_terminal

REDACTED = "********"


class JobDecision(msgspec.Struct, frozen=True):
    """The job's phase once its current run is in some phase; `restart` says the job was
    queued again by its restart policy (which counts against `max_restarts`)."""

    phase: Phase
    restart: bool = False


#: Run endings after which each restart policy gives the job another run.
_RESTART_AFTER = {
    "never": frozenset(),
    "on_failure": frozenset({Phase.FAILED, Phase.TIMED_OUT, Phase.LOST}),
    "always": frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.TIMED_OUT, Phase.LOST}),
}


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


def redacted(spec: JobSpec) -> JobSpec:
    """The spec with every secret parameter's value replaced, for showing."""
    if not any(p.secret for p in spec.parameters.values()):
        return spec
    parameters = {
        name: Parameter(value=REDACTED, secret=True) if p.secret else p
        for name, p in spec.parameters.items()
    }
    return msgspec.structs.replace(spec, parameters=parameters)
