"""Job-state rules: every cell of the transition table, walked one (from, to) pair at a time.

EXPECTED is written out by hand from the rules in protocol/state.py's docstring and
docs/protocol.md §7, independently of RUN_TRANSITIONS, so a silent edit of the table fails
here rather than passing a test that merely reads the table back.
"""

from __future__ import annotations

import itertools

import pytest

from protocol.state import (
    ACTIVE,
    RUN_TRANSITIONS,
    SUPERVISOR_REPORTABLE,
    SUPERVISOR_TERMINAL,
    TERMINAL,
    InvalidTransition,
    Phase,
    can_transition,
    check_transition,
    is_terminal,
)

pytestmark = pytest.mark.unit

Q, A, I, R, T = "queued", "assigned", "initializing", "running", "terminating"  # noqa: E741
ENDINGS = {"succeeded", "failed", "timed_out", "canceled", "lost", "rejected"}

EXPECTED: dict[str, set[str]] = {
    Q: {A, "canceled", "rejected", "timed_out"},
    A: {I, R, T} | ENDINGS,
    I: {I, R, T} | ENDINGS,
    R: {T} | ENDINGS,
    T: set(ENDINGS),
    "succeeded": set(),
    "failed": set(),
    "timed_out": set(),
    "canceled": set(),
    "lost": set(),
    "exhausted": set(),
    "rejected": set(),
}

ALL_PAIRS = list(itertools.product(list(Phase), repeat=2))


def test_expected_table_names_every_phase() -> None:
    assert set(EXPECTED) == {p.value for p in Phase}
    assert set(RUN_TRANSITIONS) == set(Phase)


def test_table_matches_the_documented_rules() -> None:
    actual = {p.value: {q.value for q in nexts} for p, nexts in RUN_TRANSITIONS.items()}
    assert actual == EXPECTED


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_every_cell(current: Phase, new: Phase) -> None:
    allowed = new.value in EXPECTED[current.value]
    assert (new in RUN_TRANSITIONS[current]) is allowed
    assert can_transition(current, new) is allowed
    assert can_transition(current.value, new.value) is allowed  # plain strings work too
    if allowed:
        result = check_transition(current.value, new.value)
        assert result is new
        assert isinstance(result, Phase)
    else:
        with pytest.raises(InvalidTransition) as info:
            check_transition(current, new)
        assert info.value.current is current
        assert info.value.new is new
        message = str(info.value)
        assert repr(current.value) in message
        assert repr(new.value) in message


@pytest.mark.parametrize("phase", sorted(TERMINAL))
def test_terminal_phases_allow_nothing(phase: Phase) -> None:
    assert is_terminal(phase)
    assert is_terminal(phase.value)
    assert RUN_TRANSITIONS[phase] == frozenset()
    for new in Phase:
        assert not can_transition(phase, new)


def test_terminal_set() -> None:
    assert {p.value for p in TERMINAL} == ENDINGS | {"exhausted"}
    assert not any(is_terminal(p) for p in ACTIVE | {Phase.QUEUED})


def test_only_initializing_may_repeat() -> None:
    repeating = {p for p in Phase if can_transition(p, p)}
    assert repeating == {Phase.INITIALIZING}


def test_nothing_goes_backwards() -> None:
    order = [Phase.QUEUED, Phase.ASSIGNED, Phase.INITIALIZING, Phase.RUNNING, Phase.TERMINATING]
    for i, later in enumerate(order):
        for earlier in order[:i]:
            assert not can_transition(later, earlier), f"{later} -> {earlier}"


def test_supervisor_reportable_phases() -> None:
    assert {p.value for p in SUPERVISOR_REPORTABLE} == {
        "initializing",
        "running",
        "terminating",
        "succeeded",
        "failed",
        "timed_out",
        "canceled",
        "rejected",
    }
    for decided_by_switchboard in (Phase.LOST, Phase.EXHAUSTED, Phase.QUEUED, Phase.ASSIGNED):
        assert decided_by_switchboard not in SUPERVISOR_REPORTABLE
    assert SUPERVISOR_TERMINAL == SUPERVISOR_REPORTABLE & TERMINAL
    assert Phase.LOST not in SUPERVISOR_TERMINAL
    assert Phase.EXHAUSTED not in SUPERVISOR_TERMINAL


def test_every_supervisor_terminal_phase_is_reachable_from_each_active_phase() -> None:
    for current in (Phase.ASSIGNED, Phase.INITIALIZING, Phase.RUNNING, Phase.TERMINATING):
        for end in SUPERVISOR_TERMINAL:
            assert can_transition(current, end)


def test_active_phases() -> None:
    assert {p.value for p in ACTIVE} == {A, I, R, T}


def test_unknown_phase_names_are_refused() -> None:
    with pytest.raises(ValueError):
        can_transition("running", "paused")
    with pytest.raises(ValueError):
        check_transition("sleeping", "running")
    with pytest.raises(ValueError):
        is_terminal("done")


def test_a_typical_run_walks_the_table() -> None:
    phase = Phase.ASSIGNED
    for new in ("initializing", "initializing", "running", "terminating", "canceled"):
        phase = check_transition(phase, new)
    assert phase is Phase.CANCELED
    with pytest.raises(InvalidTransition, match="'running' may not follow 'canceled'"):
        check_transition(phase, "running")
