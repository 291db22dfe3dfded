"""Properties of the job lifecycle rules (switchboard/lifecycle.py), without a database:
backoff grows and stays capped, restarts never exceed their budget, an ended job stays
ended, a busy refusal is a retry and not a restart, a cancel beats a restart, and each
concurrency policy does what docs/jobs.md says.

The checks walk random sequences of run endings through the rules the way a store applies
them, with their own bookkeeping, not the module's helpers.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.exceptions import TRANSIENT_ERROR_KINDS, JobErrorKind
from protocol.spec import Backoff, Concurrency, RestartPolicy
from protocol.state import ACTIVE, TERMINAL, Phase, is_terminal
from switchboard import lifecycle
from switchboard.lifecycle import (
    BUSY_RETRY_S,
    JobAtRunChange,
    RunChange,
    after_run_change,
    may_delete,
    on_cancel,
    on_submit,
    restart_delay,
)

pytestmark = pytest.mark.unit

HIGH = lambda lo, hi: hi  # noqa: E731 - a "random" that always picks the top
LOW = lambda lo, hi: lo  # noqa: E731

backoffs = st.builds(
    Backoff,
    first_s=st.floats(0, 86400),
    max_s=st.floats(0, 86400),
    factor=st.floats(1, 100),
    jitter=st.sampled_from(["none", "full", "equal", "decorrelated"]),
)
policies = st.builds(
    RestartPolicy,
    policy=st.sampled_from(["never", "on_failure", "always"]),
    max_restarts=st.integers(0, 1000),
    backoff=backoffs,
)
#: Endings a run may have (a supervisor's or the switchboard's).
run_endings = st.sampled_from(sorted(TERMINAL - {Phase.EXHAUSTED}))
error_kinds = st.sampled_from([None, *sorted(JobErrorKind)])
rands = st.sampled_from([HIGH, LOW, lambda lo, hi: (lo + hi) / 2])


@settings(max_examples=500, deadline=None)
@given(backoff=backoffs, restart=st.integers(1, 1000), rand=rands)
def test_backoff_is_capped_and_never_negative(backoff, restart, rand):
    """Whatever the policy and however many restarts (up to the 1000 a spec may allow),
    a delay is a number in [0, max_s]: never an overflow, never past the cap."""
    delay = restart_delay(backoff, restart, previous_s=backoff.max_s, rand=rand)
    assert 0.0 <= delay <= backoff.max_s


@settings(max_examples=300, deadline=None)
@given(backoff=backoffs, restart=st.integers(1, 999))
def test_the_backoff_ceiling_never_shrinks(backoff, restart):
    """Without jitter (and at the top of each jitter's range) the next restart waits at
    least as long as the one before."""
    for jitter in ("none", "full", "equal"):
        b = Backoff(
            first_s=backoff.first_s, max_s=backoff.max_s, factor=backoff.factor, jitter=jitter
        )
        assert restart_delay(b, restart, rand=HIGH) <= restart_delay(b, restart + 1, rand=HIGH)


class _Job:
    """A job as a store would hold it, moved only by the lifecycle's decisions."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.phase = Phase.QUEUED
        self.attempts = 0
        self.restarts = 0
        self.backoff_s: float | None = None
        self.cancel_requested = False
        self.not_before: float | None = None

    def facts(self) -> JobAtRunChange:
        return JobAtRunChange(
            self.attempts, self.cancel_requested, self.restarts, self.backoff_s, self.policy
        )

    def apply(self, update) -> None:
        self.phase = update.phase
        self.restarts, self.backoff_s = update.restarts, update.backoff_s
        self.not_before = update.not_before


@settings(max_examples=400, deadline=None)
@given(
    policy=policies,
    endings=st.lists(st.tuples(run_endings, error_kinds, st.booleans()), min_size=1, max_size=40),
    rand=rands,
)
def test_a_job_walked_through_random_endings(policy, endings, rand):
    """Each run ends as drawn (and may be canceled first). The job then: never restarts
    more than max_restarts times; waits out a backoff within the policy's cap after each
    restart, and BUSY_RETRY_S after a busy refusal (not a restart); is never queued again
    once canceled; and once it has ended, stays ended."""
    job, now = _Job(policy), 1000.0
    history = []
    for ending, error_kind, cancel in endings:
        if is_terminal(job.phase):
            # Ended: no run is ever made for it again, and a late change of its last run
            # (or of an older one) leaves it as it is.
            late = after_run_change(RunChange(job.attempts - 1, Phase.FAILED, now), job.facts())
            assert late is None
            assert on_cancel(job.phase, "late", "someone", now) is None
            break
        job.attempts += 1  # placed: a new run
        running = after_run_change(RunChange(job.attempts, Phase.RUNNING, now), job.facts())
        assert running is not None and running.phase == Phase.RUNNING  # the job shows its run
        job.apply(running)
        if cancel:
            decision = on_cancel(job.phase, "stop", "someone", now)
            assert decision is not None and decision.stop_run and decision.phase == job.phase
            job.cancel_requested = True
        restarts_before = job.restarts
        update = after_run_change(
            RunChange(job.attempts, ending, now, error_kind=error_kind), job.facts(), rand
        )
        assert update is not None
        job.apply(update)
        history.append(job.phase)
        assert job.restarts <= policy.max_restarts
        assert job.phase not in ACTIVE
        if job.phase != Phase.QUEUED:
            assert is_terminal(job.phase)
            assert job.not_before is None
            continue
        assert not job.cancel_requested, "a cancel beats a restart and a retry"
        busy = ending == Phase.REJECTED and JobErrorKind(error_kind) in TRANSIENT_ERROR_KINDS
        if busy:
            assert job.restarts == restarts_before
            assert job.not_before == now + BUSY_RETRY_S
        else:
            assert job.restarts == restarts_before + 1
            assert ending in (Phase.FAILED, Phase.TIMED_OUT, Phase.LOST, Phase.SUCCEEDED)
            assert now <= job.not_before <= now + policy.backoff.max_s
        now = job.not_before + 1.0
    # Restarts are counted runs: never more runs than the budget allows (busy retries aside).
    restarted = sum(1 for p in history if p == Phase.QUEUED)
    assert job.restarts <= restarted
    if Phase.EXHAUSTED in history:
        assert job.restarts == policy.max_restarts


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    ending=run_endings,
    error_kind=error_kinds,
    restarts=st.integers(0, 1000),
)
def test_a_restart_needs_budget_and_a_policy_that_asks_for_it(policy, ending, error_kind, restarts):
    job = JobAtRunChange(1, False, restarts, None, policy)
    update = after_run_change(RunChange(1, ending, 5.0, error_kind=error_kind), job)
    assert update is not None
    if update.restarts > restarts:
        assert update.restarts == restarts + 1 <= policy.max_restarts
        assert policy.policy != "never" and ending != Phase.CANCELED and ending != Phase.REJECTED
        assert [e.kind for e in update.events] == ["restart_scheduled"]
    if update.phase == Phase.EXHAUSTED:
        assert restarts >= policy.max_restarts and ending != Phase.SUCCEEDED
        assert [e.kind for e in update.events] == ["exhausted"]


@given(phase=st.sampled_from(sorted(Phase)))
def test_cancel(phase):
    decision = on_cancel(phase, "why", "me", 1.0)
    if is_terminal(phase):
        assert decision is None  # nothing leaves an ending
    elif phase == Phase.QUEUED:
        assert decision.phase == Phase.CANCELED and not decision.stop_run
    else:
        assert decision.phase == phase and decision.stop_run


holders_lists = st.lists(st.text("abc", min_size=1, max_size=3), max_size=4, unique=True)


@given(
    policy=st.sampled_from(["queue", "drop_if_running", "replace", None]),
    holders=holders_lists,
    timeout=st.one_of(st.none(), st.floats(0.001, 1e6)),
)
def test_concurrency_outcome_per_policy(policy, holders, timeout):
    """queue waits behind the holders; drop_if_running is rejected while any exists;
    replace cancels every one of them and is queued; no holder: every policy queues."""
    concurrency = Concurrency(key="k", policy=policy) if policy else None
    decision = on_submit("n", concurrency, holders, timeout, "me", 100.0)
    kinds = [e.kind for e in decision.events]
    assert kinds[0] == "submitted" and decision.events[0].actor == "me"
    if policy == "drop_if_running" and holders:
        assert decision.phase == Phase.REJECTED
        assert holders[0] in decision.reason and "'k'" in decision.reason
        assert decision.replaces == () and not decision.keep_secrets
        assert decision.queue_deadline is None
        assert kinds == ["submitted", "dropped"]
        return
    assert decision.phase == Phase.QUEUED and decision.reason is None and decision.keep_secrets
    assert decision.queue_deadline == (100.0 + timeout if timeout else None)
    expected = tuple(holders) if policy == "replace" else ()
    assert decision.replaces == expected
    assert kinds == ["submitted"] + ["replaced"] * len(expected)


def test_an_old_attempt_leaves_the_job_alone():
    job = JobAtRunChange(2, False, 0, None, RestartPolicy(policy="always"))
    assert after_run_change(RunChange(1, Phase.FAILED, 1.0), job) is None
    assert after_run_change(RunChange(2, Phase.FAILED, 1.0), job) is not None


def test_the_switchboard_endings():
    assert lifecycle.queue_timed_out(3.0).phase == Phase.TIMED_OUT
    end = lifecycle.secrets_unreadable("no key", 3.0)
    assert end.phase == Phase.REJECTED and "no key" in end.reason
    assert lifecycle.run_timed_out(2, 3.0).attempt == 2


@pytest.mark.parametrize("phase", list(Phase))
def test_only_an_ended_job_with_no_held_run_may_be_deleted(phase):
    assert may_delete(phase, has_active_run=False) == (phase in TERMINAL)
    assert not may_delete(phase, has_active_run=True)
