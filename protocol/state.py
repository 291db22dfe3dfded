"""Job and run phases, and every rule about which phase may follow which.

Theory of operation
-------------------
A *job* is what a user submitted; a *run* is one attempt at it on one supervisor. Both move
through the same vocabulary of phases::

    queued -> assigned -> initializing -> running -> terminating -> (terminal)
                                  \\________________\\______________/

    terminal: succeeded, failed, timed_out, canceled, lost, exhausted, rejected

A run starts in ``assigned`` (the switchboard picked a supervisor and sent StartJob). The
supervisor reports ``initializing`` (possibly several times, once per stage), ``running``,
``terminating`` and finally a terminal phase. The switchboard alone decides ``lost`` (the host
vanished) and ``exhausted`` (a job whose restarts are used up).

Transitions only move forward. ``initializing -> initializing`` is allowed so a supervisor
can report a new stage; every other self-transition is refused. Nothing leaves a terminal
phase. A job that is retried gets a *new* run: the old run stays terminal, and the job goes
back to ``queued`` (the only backward step, and one the switchboard takes, never a
supervisor: when, is decided by its lifecycle rules, switchboard/lifecycle.py).

The table :data:`RUN_TRANSITIONS` is the single source of these rules; docs/protocol.md is
written from it and tests walk every cell of it.
"""

from __future__ import annotations

import enum

from .exceptions import SwitchboardProtocolError


class Phase(enum.StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    INITIALIZING = "initializing"
    RUNNING = "running"
    TERMINATING = "terminating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    LOST = "lost"
    EXHAUSTED = "exhausted"
    REJECTED = "rejected"


TERMINAL: frozenset[Phase] = frozenset(
    {
        Phase.SUCCEEDED,
        Phase.FAILED,
        Phase.TIMED_OUT,
        Phase.CANCELED,
        Phase.LOST,
        Phase.EXHAUSTED,
        Phase.REJECTED,
    }
)

#: Phases a run is in while a supervisor holds it.
ACTIVE: frozenset[Phase] = frozenset(
    {Phase.ASSIGNED, Phase.INITIALIZING, Phase.RUNNING, Phase.TERMINATING}
)

#: Terminal phases a supervisor may report for a run it held. `lost` and `exhausted` are
#: decided by the switchboard only.
SUPERVISOR_TERMINAL: frozenset[Phase] = frozenset(
    {Phase.SUCCEEDED, Phase.FAILED, Phase.TIMED_OUT, Phase.CANCELED, Phase.REJECTED}
)

#: Phases a supervisor may put in a state-transition event.
SUPERVISOR_REPORTABLE: frozenset[Phase] = frozenset(
    {Phase.INITIALIZING, Phase.RUNNING, Phase.TERMINATING} | SUPERVISOR_TERMINAL
)

_ENDINGS = frozenset(TERMINAL - {Phase.EXHAUSTED})

#: current phase -> phases that may follow it (for a run; a job follows the same table).
RUN_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.ASSIGNED, Phase.CANCELED, Phase.REJECTED, Phase.TIMED_OUT}),
    Phase.ASSIGNED: frozenset({Phase.INITIALIZING, Phase.RUNNING, Phase.TERMINATING} | _ENDINGS),
    Phase.INITIALIZING: frozenset(
        {Phase.INITIALIZING, Phase.RUNNING, Phase.TERMINATING} | _ENDINGS
    ),
    Phase.RUNNING: frozenset({Phase.TERMINATING} | _ENDINGS),
    Phase.TERMINATING: _ENDINGS,
    **{phase: frozenset() for phase in TERMINAL},
}


def is_terminal(phase: Phase | str) -> bool:
    """True if nothing may follow `phase`."""
    return Phase(phase) in TERMINAL


class InvalidTransition(SwitchboardProtocolError):
    """A phase change that the job-state rules do not allow."""

    def __init__(self, current: Phase, new: Phase) -> None:
        super().__init__(current, new)
        self.current = current
        self.new = new

    def __str__(self) -> str:
        return f"phase {self.new.value!r} may not follow {self.current.value!r}"


def can_transition(current: Phase | str, new: Phase | str) -> bool:
    """True if `new` may follow `current`."""
    return Phase(new) in RUN_TRANSITIONS[Phase(current)]


def check_transition(current: Phase | str, new: Phase | str) -> Phase:
    """Return `new` as a Phase, or raise InvalidTransition if it may not follow `current`."""
    if not can_transition(current, new):
        raise InvalidTransition(Phase(current), Phase(new))
    return Phase(new)
