"""The store contract (tests/test_store_contract.py) on the PostgreSQL store: the same
tests, imported, with a `store` on the private cluster of the session (tests/postgres.py).
One database for the module, emptied before each test (TRUNCATE is quicker than a new
database)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import asyncpg
import pytest

from protocol.messages import Output
from switchboard.store.errors import QueueFull
from switchboard.store.postgres import PostgresStore
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.test_store_contract import *  # noqa: F403 - the contract's tests, run here again
from tests.test_store_contract import SPEC, hello

pytestmark = pytest.mark.postgres

_names = itertools.count()


@pytest.fixture(scope="module")
def database(postgres: Cluster) -> str:
    return postgres.new_database(f"contract_{next(_names)}")


async def _empty(dsn: str) -> None:
    """Every table of the store emptied, its ids restarted; the schema's version kept."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename != 'switchboard_schema'"
        )
        if tables:
            names = ", ".join(f'"{row[0]}"' for row in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY")
    finally:
        await conn.close()


@pytest.fixture
async def store(database: str) -> AsyncIterator[PostgresStore]:
    await _empty(database)
    made = PostgresStore(database, max_connections=4)
    await made.open()
    yield made
    await made.close()


async def test_batches_of_one_supervisor_are_stored_in_the_order_handed_over(store):
    """apply_events hands each batch over when called: many at once, on a pool whose
    transactions run side by side, are still stored in order (each after_seq holds)."""
    await store.create_job("j1", SPEC)
    await store.supervisor_connected(hello())
    [run] = await store.assign([("j1", "s1")])

    def chunk(seq: int) -> Output:
        return Output(
            seq=seq, job_id="j1", attempt=run.attempt, stream="stdout", offset=seq - 1, data=b"x"
        )

    batches = [store.apply_events("s1", [chunk(n)], n - 1) for n in range(1, 41)]
    applied = [await batch for batch in batches]
    assert [a.stored_seq for a in applied] == list(range(1, 41))
    assert await store.read_output("j1", run.attempt, "stdout") == b"x" * 40


async def test_the_change_log_waits_for_a_change_that_may_still_commit(store, database):
    """A rev drawn by a transaction still running is not passed over by a reader that
    sees a later one; once that transaction ends, committed or rolled back, it is."""
    for job_id in ("a", "b", "c"):
        await store.create_job(job_id, SPEC)
    start = await store.latest_job_change()
    slow = await asyncpg.connect(database)
    try:
        for outcome, later in (("COMMIT", "b"), ("ROLLBACK", "c")):
            await slow.execute("BEGIN")
            # Draws a rev (the job_updated trigger) and holds it uncommitted.
            await slow.execute("UPDATE jobs SET unschedulable = 'x' WHERE id = 'a'")
            await store.request_cancel(later)  # a later rev, committed
            assert await store.job_changes(start, 100) == []  # waits at the missing rev
            await slow.execute(outcome)
            changes = await store.job_changes(start, 100)
            wanted = ["a", later] if outcome == "COMMIT" else [later]
            assert [c.job_id for c in changes] == wanted
            start = changes[-1].rev
    finally:
        await slow.close()


async def test_submissions_side_by_side_never_overfill_the_queue(store):
    """The SQLite store counts the queue in its one writer; on PostgreSQL, submissions run
    side by side on the pool and must still never take more places than there are."""
    results = await asyncio.gather(
        *(store.create_jobs([(f"q{i}", SPEC)], "", max_queued=10) for i in range(30)),
        return_exceptions=True,
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    assert len(made) == 10
    assert all(isinstance(r, QueueFull) for r in results if isinstance(r, BaseException))
    assert await store.queue_length() == 10


async def test_far_from_the_limit_submissions_do_not_wait_for_each_other(store, database):
    """Far from the queue's limit a submission takes the queue's lock shared, so one still
    committing (here: a transaction holding it shared) does not hold the next up; near the
    limit it counts alone, waiting for those in flight, so its count is exact."""
    other = await asyncpg.connect(database)
    try:
        async with other.transaction():
            await other.execute(
                "SELECT pg_advisory_xact_lock_shared(hashtext('switchboard queue'))"
            )
            made = await asyncio.wait_for(
                store.create_jobs([("far", SPEC)], "", max_queued=5000), timeout=10
            )
            assert [m.id for m in made] == ["far"]
            near = asyncio.ensure_future(store.create_jobs([("near", SPEC)], "", max_queued=1001))
            await asyncio.sleep(0.5)
            assert not near.done()  # it waits for the submission in flight
        assert [m.id for m in await asyncio.wait_for(near, timeout=10)] == ["near"]
    finally:
        await other.close()
