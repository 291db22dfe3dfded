"""What to do with each run when a supervisor (re)connects: one table, one pure function.

Reconciliation runs once the switchboard has stored every event the supervisor had sent
before its Hello (Hello.last_seq), so the store's view is as fresh as the supervisor's.
Then each run is in exactly one row:

| switchboard (store)           | supervisor (Hello.runs) | action                         |
|-------------------------------|-------------------------|--------------------------------|
| active, not cancel requested  | holds it                | ADOPT: events keep flowing     |
| active, cancel requested      | holds it                | STOP (reason canceled)         |
| assigned, not cancel requested| does not hold it        | RESEND StartJob                |
| assigned, cancel requested    | does not hold it        | FINALIZE as canceled           |
| started (initializing, running, terminating) | does not hold it | FINALIZE as lost     |
| not active (ended or unknown) | holds it                | STOP (reason unwanted): zombie |

"assigned" means StartJob was sent but no report came back; a StartJob is idempotent on
the supervisor, so resending it can't start the program twice.

The same table repairs drift on a live connection (`drift`): every few heartbeats the
switchboard asks each supervisor for its runs (StatusRequest) and, once the events sent
before the StatusReply are stored, applies the rows that can't be explained by a message
still on its way: a run the store has started that the supervisor no longer holds ends
`lost`, and a run it holds that the store doesn't want is stopped. The `assigned` rows
are left out (on a live connection a StartJob may be on its way), and so is a canceled
run it holds (its StopJob went out with the cancel; it may take its grace to end), and
the runs with events after the reply (the reply is older than what the store knows).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence

import msgspec

from protocol.messages import HeldRun
from protocol.state import Phase
from switchboard.models import ActiveRun


class Action(enum.StrEnum):
    ADOPT = "adopt"
    STOP = "stop"
    RESEND = "resend"
    FINALIZE_CANCELED = "finalize_canceled"
    FINALIZE_LOST = "finalize_lost"
    STOP_ZOMBIE = "stop_zombie"


class Decision(msgspec.Struct, frozen=True):
    action: Action
    job_id: str
    attempt: int
    run: ActiveRun | None = None


def decide(assigned: ActiveRun | None, held: HeldRun | None) -> Action:
    """The table above, row by row."""
    if assigned is None:
        if held is None:
            raise ValueError("a run must be known to one side at least")
        return Action.STOP_ZOMBIE
    if held is not None:
        return Action.STOP if assigned.cancel_requested else Action.ADOPT
    if assigned.phase == Phase.ASSIGNED:
        return Action.FINALIZE_CANCELED if assigned.cancel_requested else Action.RESEND
    return Action.FINALIZE_LOST


#: The actions `drift` takes on a live connection (see the module docstring).
LIVE_ACTIONS: frozenset[Action] = frozenset({Action.STOP_ZOMBIE, Action.FINALIZE_LOST})


def reconcile(assigned: Sequence[ActiveRun], held: Sequence[HeldRun]) -> list[Decision]:
    """One decision per run known to either side."""
    mine = {(r.job_id, r.attempt): r for r in assigned}
    theirs = {(r.job_id, r.attempt): r for r in held}
    decisions = []
    for key in sorted(mine.keys() | theirs.keys()):
        run = mine.get(key)
        decisions.append(Decision(decide(run, theirs.get(key)), key[0], key[1], run))
    return decisions


def drift(
    assigned: Sequence[ActiveRun],
    held: Sequence[HeldRun],
    newer: Collection[tuple[str, int]] = (),
) -> list[Decision]:
    """The decisions a StatusReply calls for on a live connection: those of `reconcile`
    whose action is in LIVE_ACTIONS, for runs not in `newer` (runs with events after it)."""
    return [
        d
        for d in reconcile(assigned, held)
        if d.action in LIVE_ACTIONS and (d.job_id, d.attempt) not in newer
    ]
