"""What a run's ending means for its job. Pure functions; the store applies them.

Restart policies (later) plug in here: this module alone decides whether a job gets
another run.
"""

from __future__ import annotations

import msgspec

from protocol.exceptions import TRANSIENT_ERROR_KINDS, JobErrorKind
from protocol.spec import JobSpec, Parameter
from protocol.state import Phase, is_terminal

REDACTED = "********"


def job_phase_after_run(
    run_phase: Phase, *, error_kind: str | None, cancel_requested: bool
) -> Phase:
    """The job's phase once its current run is in `run_phase`.

    While the run is active the job shows the run's phase. A run refused because the
    supervisor was busy sends the job back to the queue (a different supervisor, or the
    same one later, may take it); any other ending is the job's ending.
    """
    if not is_terminal(run_phase):
        return run_phase
    if cancel_requested:
        return Phase.CANCELED if run_phase != Phase.SUCCEEDED else run_phase
    if run_phase == Phase.REJECTED and error_kind is not None:
        if JobErrorKind(error_kind) in TRANSIENT_ERROR_KINDS:
            return Phase.QUEUED
    return run_phase


def redacted(spec: JobSpec) -> JobSpec:
    """The spec with every secret parameter's value replaced, for showing."""
    if not any(p.secret for p in spec.parameters.values()):
        return spec
    parameters = {
        name: Parameter(value=REDACTED, secret=True) if p.secret else p
        for name, p in spec.parameters.items()
    }
    return msgspec.structs.replace(spec, parameters=parameters)
