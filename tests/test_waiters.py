"""switchboard.waiters on a real SQLite store (on disk, no process): a waiter is woken by
the ending of its job, whichever path stored it, and only by an ending; the watch started
after an ending was stored still finds it; closing answers every waiter; a thousand
waiters are woken by one pass each time something ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from protocol.spec import JobSpec, NoopBackend
from switchboard.changes import Changes
from switchboard.store.sqlite import SQLiteStore
from switchboard.waiters import JobWaiters

pytestmark = pytest.mark.unit

SPEC = JobSpec(name="w", backend=NoopBackend())


@pytest.fixture
async def waiters(store: SQLiteStore) -> AsyncIterator[JobWaiters]:
    found = JobWaiters(store, Changes(store))
    task = asyncio.create_task(found.run())
    yield found
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_an_ending_wakes_its_waiter_and_nothing_else_does(store, waiters):
    await store.create_job("a", SPEC)
    await store.create_job("b", SPEC)
    with waiters.registered(["a"]) as woken:
        assert waiters.count == 1
        await store.request_cancel("b")  # another job's ending
        await store.create_job("c", SPEC)  # a write about something else
        await waiters.wait(woken, 0.3)
        assert not woken.done()
        await store.request_cancel("a")
        ended = await waiters.wait(woken, 5)
        assert woken.done()
    assert waiters.count == 0
    # The wake carries the job as it ended (read with the change log): no read of its own.
    assert ended["a"] == await store.get_job_detail("a")
    assert ended["a"].phase == "canceled"


async def test_endings_a_write_read_wake_their_waiters_with_them(store, waiters):
    await store.create_job("a", SPEC)
    await store.create_job("b", SPEC)
    assert not waiters.is_waited("a")
    with waiters.registered(["a"]) as woken:
        assert waiters.is_waited("a") and not waiters.is_waited("b")
        # As a batch of events that ended it hands it over (no write here: the pass over
        # the change log has nothing to wake it for).
        job = await store.get_job_detail("a")
        waiters.found_ended([job])
        await asyncio.sleep(0)  # on the loop's next turn, with those of the same group
        assert woken.done() and woken.result() == {"a": job}
    assert not waiters.is_waited("a")
    # Two writes of one group: a request waiting for both jobs is woken once, with both.
    with waiters.registered(["a", "b"]) as woken:
        jobs = [await store.get_job_detail(job_id) for job_id in ("a", "b")]
        waiters.found_ended(jobs[:1])
        waiters.found_ended(jobs[1:])
        assert not woken.done()
        await asyncio.sleep(0)
        assert woken.result() == {"a": jobs[0], "b": jobs[1]}


async def test_an_ending_stored_before_the_watch_started_is_found(store, waiters):
    await store.create_job("a", SPEC)
    await asyncio.sleep(0.05)  # the loop sleeps: nobody waits
    with waiters.registered(["a"]) as woken:
        # Ended after the request read it, before the loop took its mark.
        await store.request_cancel("a")
        await waiters.wait(woken, 5)
        assert woken.done()


async def test_a_wait_ends_with_its_timeout(store, waiters):
    await store.create_job("a", SPEC)
    with waiters.registered(["a"]) as woken:
        await asyncio.wait_for(waiters.wait(woken, 0.1), 5)
        assert not woken.done()


async def test_close_answers_every_waiter_and_later_ones_at_once(store, waiters):
    await store.create_job("a", SPEC)
    with waiters.registered(["a"]) as woken:
        waiters.close()
        assert woken.done()
    with waiters.registered(["a"]) as later:
        assert later.done()


async def test_many_waiters_one_listing_of_many_jobs(store, waiters):
    ids = [f"j{i}" for i in range(1000)]
    for job_id in ids:
        await store.create_job(job_id, SPEC)
    with contextlib.ExitStack() as stack:
        woken = [stack.enter_context(waiters.registered([job_id])) for job_id in ids]
        many = stack.enter_context(waiters.registered(ids[:500]))
        await store.request_cancel("j7")
        await waiters.wait(woken[7], 5)
        await waiters.wait(many, 5)
        assert woken[7].done() and many.done()
        assert sum(f.done() for f in woken) == 1
        assert waiters.count == 1001
    assert waiters.count == 0


async def _late_waiter(store, waiters, change) -> bool:
    """A waiter for "b" registered while the pass reads the changes, `change` among them
    (while another waiter keeps the watch on): whether it is woken."""
    await store.create_job("a", SPEC)
    await store.create_job("b", SPEC)
    real = store.ended_among_changes
    late: list[asyncio.Future[None]] = []
    with contextlib.ExitStack() as stack:

        async def reading(*args, **kwargs):  # the request of b comes during the read
            found = await real(*args, **kwargs)
            if not late:
                late.append(stack.enter_context(waiters.registered(["b"])))
            return found

        with waiters.registered(["a"]):
            await store.create_job("c", SPEC)  # the watch is on, its mark taken
            await asyncio.sleep(0.1)
            store.ended_among_changes = reading
            await change()
            for _ in range(50):
                if late:
                    break
                await asyncio.sleep(0.01)
            assert late
            await waiters.wait(late[0], 0.5)  # (well short of the loop's POLL_S)
            return late[0].done()


async def test_a_waiter_that_came_while_the_changes_were_read_is_woken(store, waiters):
    """The pass reads the changes and which waited-for jobs among them ended in one go,
    for the waiters of the moment: one registered meanwhile, whose job's ending is among
    the changes read, is looked up after it (the mark moves past that ending)..."""
    assert await _late_waiter(store, waiters, lambda: store.request_cancel("b"))


async def test_a_waiter_that_came_while_the_changes_were_read_is_not_woken_for_less(store, waiters):
    """... and only if its job ended: a change that is no ending wakes nobody."""
    assert not await _late_waiter(store, waiters, lambda: store.set_unschedulable({"b": "no"}))
