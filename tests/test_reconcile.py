"""Every row of the reconciliation table in switchboard/reconcile.py."""

from __future__ import annotations

import pytest

from protocol.messages import HeldRun
from protocol.spec import JobSpec, NoopBackend
from protocol.state import Phase
from switchboard.models import ActiveRun
from switchboard.reconcile import Action, decide, drift, reconcile

pytestmark = pytest.mark.unit

SPEC = JobSpec(name="t", backend=NoopBackend())


def _assigned(phase: Phase, cancel: bool = False) -> ActiveRun:
    return ActiveRun("job", 1, phase, cancel, SPEC)


HELD = HeldRun("job", 1, Phase.RUNNING)


@pytest.mark.parametrize(
    ("assigned", "held", "action"),
    [
        (_assigned(Phase.RUNNING), HELD, Action.ADOPT),
        (_assigned(Phase.ASSIGNED), HELD, Action.ADOPT),
        (_assigned(Phase.INITIALIZING), HELD, Action.ADOPT),
        (_assigned(Phase.RUNNING, cancel=True), HELD, Action.STOP),
        (_assigned(Phase.ASSIGNED), None, Action.RESEND),
        (_assigned(Phase.ASSIGNED, cancel=True), None, Action.FINALIZE_CANCELED),
        (_assigned(Phase.INITIALIZING), None, Action.FINALIZE_LOST),
        (_assigned(Phase.RUNNING), None, Action.FINALIZE_LOST),
        (_assigned(Phase.TERMINATING), None, Action.FINALIZE_LOST),
        (None, HELD, Action.STOP_ZOMBIE),
    ],
)
def test_each_row(assigned, held, action):
    assert decide(assigned, held) is action


def test_a_run_known_to_neither_side_is_a_bug():
    with pytest.raises(ValueError):
        decide(None, None)


def test_reconcile_covers_the_union_of_both_sides_once():
    assigned = [
        ActiveRun("a", 1, Phase.RUNNING, False, SPEC),
        ActiveRun("b", 2, Phase.ASSIGNED, False, SPEC),
    ]
    held = [HeldRun("a", 1, Phase.RUNNING), HeldRun("z", 1, Phase.RUNNING)]
    decisions = {(d.job_id, d.attempt): d.action for d in reconcile(assigned, held)}
    assert decisions == {
        ("a", 1): Action.ADOPT,
        ("b", 2): Action.RESEND,
        ("z", 1): Action.STOP_ZOMBIE,
    }


def test_a_different_attempt_is_a_different_run():
    assigned = [ActiveRun("a", 2, Phase.RUNNING, False, SPEC)]
    held = [HeldRun("a", 1, Phase.RUNNING)]
    decisions = {(d.job_id, d.attempt): d.action for d in reconcile(assigned, held)}
    assert decisions == {("a", 1): Action.STOP_ZOMBIE, ("a", 2): Action.FINALIZE_LOST}


def test_drift_takes_only_what_a_live_connection_cannot_explain():
    """On a live connection a StatusReply acts like a Hello for started runs and zombies,
    but leaves assigned runs (a StartJob may be on its way), canceled runs being stopped,
    and runs with events after the reply alone."""
    assigned = [
        ActiveRun("started", 1, Phase.RUNNING, False, SPEC),
        ActiveRun("sent", 1, Phase.ASSIGNED, False, SPEC),
        ActiveRun("sent-canceled", 1, Phase.ASSIGNED, True, SPEC),
        ActiveRun("stopping", 1, Phase.RUNNING, True, SPEC),
        ActiveRun("newer", 1, Phase.RUNNING, False, SPEC),
    ]
    held = [HeldRun("stopping", 1, Phase.TERMINATING), HeldRun("zombie", 1, Phase.RUNNING)]
    decisions = {(d.job_id, d.attempt): d.action for d in drift(assigned, held, {("newer", 1)})}
    assert decisions == {("started", 1): Action.FINALIZE_LOST, ("zombie", 1): Action.STOP_ZOMBIE}
