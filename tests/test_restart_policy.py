"""Restart policies: the backoff formulas, the decision table, and the store applying them."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.spec import Backoff, JobSpec, NoopBackend, RestartPolicy
from protocol.state import Phase
from switchboard.lifecycle import JobDecision, job_after_run, restart_delay
from tests.store_setup import HELLO, state

pytestmark = pytest.mark.unit

HIGH = lambda lo, hi: hi  # noqa: E731 - a "random" that always picks the top
LOW = lambda lo, hi: lo  # noqa: E731


def test_ceiling_grows_by_factor_up_to_max():
    b = Backoff(first_s=1, max_s=10, factor=2, jitter="none")
    assert [restart_delay(b, n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize(
    ("jitter", "low", "high"),
    [("none", 4, 4), ("full", 0, 4), ("equal", 2, 4), ("decorrelated", 1, 9)],
)
def test_jitter_bounds(jitter, low, high):
    b = Backoff(first_s=1, max_s=10, factor=2, jitter=jitter)
    # restart 3: ceiling 4; decorrelated draws from [first, 3 * previous] = [1, 9], capped
    assert restart_delay(b, 3, previous_s=3.0, rand=LOW) == low
    assert restart_delay(b, 3, previous_s=3.0, rand=HIGH) == min(high, 9)
    for _ in range(200):
        assert low <= restart_delay(b, 3, previous_s=3.0) <= high


def test_decorrelated_never_exceeds_max():
    b = Backoff(first_s=1, max_s=5, jitter="decorrelated")
    assert restart_delay(b, 9, previous_s=100.0, rand=HIGH) == 5


ON_FAILURE = RestartPolicy(policy="on_failure", max_restarts=2)
ALWAYS = RestartPolicy(policy="always", max_restarts=1)
NEVER = RestartPolicy()


@pytest.mark.parametrize(
    ("run_phase", "policy", "done", "expected"),
    [
        (Phase.RUNNING, ON_FAILURE, 0, JobDecision(Phase.RUNNING)),
        (Phase.FAILED, NEVER, 0, JobDecision(Phase.FAILED)),
        (Phase.FAILED, ON_FAILURE, 0, JobDecision(Phase.QUEUED, restart=True)),
        (Phase.LOST, ON_FAILURE, 1, JobDecision(Phase.QUEUED, restart=True)),
        (Phase.TIMED_OUT, ON_FAILURE, 2, JobDecision(Phase.EXHAUSTED)),
        (Phase.SUCCEEDED, ON_FAILURE, 0, JobDecision(Phase.SUCCEEDED)),
        (Phase.SUCCEEDED, ALWAYS, 0, JobDecision(Phase.QUEUED, restart=True)),
        (Phase.SUCCEEDED, ALWAYS, 1, JobDecision(Phase.SUCCEEDED)),
        (Phase.FAILED, ALWAYS, 1, JobDecision(Phase.EXHAUSTED)),
        (Phase.CANCELED, ALWAYS, 0, JobDecision(Phase.CANCELED)),
        (Phase.REJECTED, ALWAYS, 0, JobDecision(Phase.REJECTED)),
    ],
)
def test_decisions(run_phase, policy, done, expected):
    decision = job_after_run(
        run_phase, error_kind=None, cancel_requested=False, restart=policy, restarts_done=done
    )
    assert decision == expected


def test_cancel_wins_over_restart():
    decision = job_after_run(
        Phase.FAILED, error_kind=None, cancel_requested=True, restart=ON_FAILURE, restarts_done=0
    )
    assert decision == JobDecision(Phase.CANCELED)


def test_busy_refusal_requeues_without_counting():
    decision = job_after_run(
        Phase.REJECTED,
        error_kind="max_concurrent_jobs",
        cancel_requested=False,
        restart=NEVER,
        restarts_done=0,
    )
    assert decision == JobDecision(Phase.QUEUED)


async def test_store_requeues_after_backoff_then_exhausts(store):
    spec = JobSpec(
        name="flaky",
        backend=NoopBackend(),
        restart=RestartPolicy(
            policy="on_failure", max_restarts=1, backoff=Backoff(first_s=0.2, jitter="none")
        ),
    )
    await store.create_job("j1", spec)

    await store.supervisor_connected(HELLO)
    [first] = await store.assign([("j1", "s1")])
    await store.apply_events("s1", [state(1, Phase.RUNNING), state(2, Phase.FAILED)])
    job = await store.get_job("j1")
    assert job.phase == Phase.QUEUED and "restart 1 of 1" in job.reason
    assert await store.queued_jobs(10) == []  # waiting out its backoff
    snapshot = await store.placement_snapshot(lambda fleet: 10)
    assert (
        snapshot.queue == [] and snapshot.next_backoff_end is not None
    )  # the dispatcher's wake-up

    await asyncio.sleep(0.25)
    assert [q.id for q in await store.queued_jobs(10)] == ["j1"]
    [second] = await store.assign([("j1", "s1")])
    assert second.attempt == first.attempt + 1
    await store.apply_events(
        "s1", [state(3, Phase.RUNNING, attempt=2), state(4, Phase.FAILED, attempt=2)]
    )
    assert (await store.get_job("j1")).phase == Phase.EXHAUSTED


@settings(max_examples=300, deadline=None)
@given(
    first=st.floats(0, 100),
    cap=st.floats(0, 1000),
    factor=st.floats(1, 100),
    jitter=st.sampled_from(["none", "full", "equal", "decorrelated"]),
    restart=st.integers(1, 60),
    previous=st.floats(0, 1000),
)
def test_every_delay_is_within_the_documented_formula(
    first, cap, factor, jitter, restart, previous
):
    """docs/jobs.md: ceiling(n) = min(max_s, first_s * factor**(n-1)); none = ceiling,
    full in [0, ceiling], equal in [ceiling/2, ceiling], decorrelated in
    [first_s, 3 * previous] capped at max_s."""
    b = Backoff(first_s=first, max_s=cap, factor=factor, jitter=jitter)
    ceiling = min(cap, first * factor ** (restart - 1))
    delay = restart_delay(b, restart, previous_s=previous)
    eps = 1e-9 * max(1.0, ceiling, cap)
    match jitter:
        case "none":
            assert delay == pytest.approx(ceiling)
        case "full":
            assert -eps <= delay <= ceiling + eps
        case "equal":
            assert ceiling / 2 - eps <= delay <= ceiling + eps
        case "decorrelated":
            assert delay <= cap + eps
            assert delay >= min(cap, first) - eps
            assert delay <= max(first, 3 * previous) + eps
