"""run()'s natural batching, its pure part (switchboard.client.batching): who sends which
submissions and which waits, and what each answer settles. The requests themselves are
tested against a real switchboard in tests/test_client_run_batching.py."""

from __future__ import annotations

import pytest

from protocol.state import Phase
from switchboard.client import batching
from switchboard.client.batching import ALONE, Call, Submissions, Waits
from switchboard.client.core import Deadline
from switchboard.client.errors import BadRequest, ConnectionFailed, NotFound, Unauthorized
from switchboard.models import JobView

pytestmark = pytest.mark.unit


def call(job_id: str = "", timeout: float | None = None) -> Call:
    return Call(b"{}", Deadline(timeout), job_id)


def view(job_id: str) -> JobView:
    from protocol.spec import JobSpec, NoopBackend

    return JobView(
        id=job_id,
        name="n",
        spec=JobSpec(name="n", backend=NoopBackend()),
        phase=Phase.SUCCEEDED,
        created_at=0.0,
        updated_at=0.0,
    )


def test_one_batch_in_flight_takes_all_pending_then_the_rest():
    subs = Submissions()
    first, second, third = call(), call(), call()
    subs.add(first)
    assert subs.take() == [first]
    subs.add(second)
    subs.add(third)
    assert subs.take() == []  # one in flight: the others wait for it
    subs.sent([first], ["a"])
    assert first.settled() == "a" and first.job_id == "a"
    assert first.settled() is None  # taken
    assert subs.take() == [second, third]  # all that came meanwhile, in one
    fourth = call()
    subs.add(fourth)
    # Woken: the batch's calls, and the oldest pending (it sends the next batch).
    assert subs.sent([second, third], ["b", "c"]) == [second, third, fourth]
    assert (second.job_id, third.job_id) == ("b", "c")
    assert subs.take() == [fourth]


def test_a_batch_holds_at_most_1000():
    subs = Submissions()
    calls = [call() for _ in range(1500)]
    for c in calls:
        subs.add(c)
    batch = subs.take()
    assert batch == calls[:1000]
    subs.sent(batch, [str(i) for i in range(1000)])
    assert subs.take() == calls[1000:]


def test_a_refused_batch_sends_each_alone_a_broken_one_fails_each():
    refused = BadRequest("no", 400, "invalid_spec", "bad", "[1].name")
    assert batching.batch_failed(refused) is ALONE
    broken = ConnectionFailed("gone")
    assert batching.batch_failed(broken) is broken
    subs = Submissions()
    a, b = call(), call()
    subs.add(a)
    subs.add(b)
    batch = subs.take()
    subs.sent(batch, ALONE)
    assert a.settled() is ALONE and b.settled() is ALONE
    assert not subs.sending


def test_a_wait_names_every_job_no_request_names():
    waits = Waits()
    a, b, c = call("a"), call("b"), call("c")
    for x in (a, b, c):
        waits.add(x)
    assert waits.take(a, 0.0) == ["a", "b", "c"]
    assert waits.take(b, 0.0) == []  # named by the request in flight
    d = call("d")
    waits.add(d)
    assert waits.take(d, 0.0) == ["d"]  # its job is named by none: it asks
    # Woken: b (its job ended), and a and c (no request names their jobs now), not d.
    assert waits.answered(["a", "b", "c"], [view("b")]) == [b, a, c]
    assert b.settled() == view("b")
    assert "b" not in waits.waiting
    # a and c ask again: whoever looks first names both.
    assert waits.take(c, 0.0) == ["c", "a"]
    assert waits.in_flight == 2


def test_a_wait_names_at_most_500_jobs():
    waits = Waits()
    calls = [call(str(i)) for i in range(700)]
    for c in calls:
        waits.add(c)
    first = waits.take(calls[0], 0.0)
    assert len(first) == 500
    second = waits.take(calls[600], 0.0)
    assert len(second) == 200 and not set(first) & set(second)


def test_past_the_bound_a_new_job_waits_for_an_answer_or_the_patience():
    waits = Waits(most=2, patience_s=0.1)
    long1, long2, short = call("l1"), call("l2"), call("s", timeout=60)
    waits.add(long1)
    assert waits.take(long1, 10.0) == ["l1"]
    waits.add(long2)
    assert waits.take(long2, 10.0) == ["l2"]
    waits.add(short)
    assert waits.take(short, 10.05) == []  # two in flight, the newest young
    assert waits.retry_in(10.05) == pytest.approx(0.05)
    assert waits.pause_s(short.deadline, 10.05) == pytest.approx(0.05)
    assert waits.take(short, 10.2) == ["s"]  # they wait long: one more
    waits.answered(["l1"], None)  # (nothing ended: l1 asks again)
    assert waits.in_flight == 2 and waits.covered == {"l2", "s"}
    assert long1.settled() is None and waits.take(long1, 10.2) == []
    assert waits.take(long1, 10.3) == ["l1"]


def test_a_wait_with_room_sleeps_until_woken_or_its_deadline():
    waits = Waits()
    a = call("a")
    waits.add(a)
    waits.take(a, 0.0)
    assert waits.pause_s(a.deadline, 0.0) is None  # no deadline: until an answer
    b = call("b", timeout=5)
    assert 0 < (waits.pause_s(b.deadline, 0.0) or 0) <= 5


def test_a_failed_wait_settles_all_it_named():
    gone = NotFound("no", 404, "not_found", "ids: no job 'x'", "ids")
    assert batching.wait_failed(gone) is ALONE
    revoked = Unauthorized("no", 401, "unauthorized", "revoked", None)
    assert batching.wait_failed(revoked) is revoked
    waits = Waits()
    a, b, c = call("a"), call("b"), call("c")
    for x in (a, b):
        waits.add(x)
    ids = waits.take(a, 0.0)
    waits.add(c)
    waits.answered(ids, ALONE)
    assert a.settled() is ALONE and b.settled() is ALONE
    assert c.settled() is None and waits.waiting == {"c": c}
    assert waits.covered == set() and waits.in_flight == 0


def test_a_call_that_leaves_is_no_longer_asked_for():
    waits = Waits()
    a, b = call("a"), call("b")
    waits.add(a)
    waits.add(b)
    waits.leave(a)
    assert waits.take(b, 0.0) == ["b"]
