"""The SQLite store on disk: events applied once, output appended only at its offset,
everything durable across a reopen."""

from __future__ import annotations

import asyncio

import pytest

from protocol.exceptions import JobErrorKind
from protocol.messages import Hello, JobErrorReport, JobExit, RunRef
from protocol.state import Phase
from switchboard.store.errors import BatchOutOfOrder
from switchboard.store.sqlite import SQLiteStore
from tests.store_setup import HELLO, SPEC, assigned_job, out, state

pytestmark = pytest.mark.unit


async def test_lifecycle_and_phases_in_order(store):
    made = await assigned_job(store)
    assert made.attempt == 1
    result = await store.apply_events(
        "s1",
        [
            state(1, Phase.INITIALIZING, stage="fetching"),
            state(2, Phase.RUNNING),
            out(3, 0, b"hello "),
            out(4, 6, b"world"),
            JobExit(seq=5, job_id="j1", attempt=1, exit_code=0),
            state(6, Phase.SUCCEEDED),
        ],
    )
    assert result.stored_seq == 6 and result.ended == [RunRef("j1", 1)]
    job = await store.get_job("j1")
    assert job.phase == Phase.SUCCEEDED and job.exit_code == 0
    assert [p.phase for p in job.runs[0].phases] == [
        "assigned",
        "initializing",
        "running",
        "succeeded",
    ]
    assert await store.read_output("j1", 1, "stdout") == b"hello world"
    assert await store.read_output("j1", 1, "stdout", 3, 8) == b"lo wo"


async def test_a_batch_reads_the_waited_for_jobs_it_ended(store):
    """The jobs someone waits for that a batch ended come back with it, as GET
    /api/v1/jobs/{id} shows them (their waiters answer with these); a job nobody waits
    for, or one a batch did not end, does not."""
    for job_id in ("j1", "j2", "j3"):
        await store.create_job(job_id, SPEC)
    await store.supervisor_connected(HELLO)
    await store.assign([("j1", "s1"), ("j2", "s1"), ("j3", "s1")])
    asked: list[str] = []

    def waited(job_id: str) -> bool:
        asked.append(job_id)
        return job_id in ("j1", "j3")

    result = await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING, "j1"),
            JobExit(seq=2, job_id="j1", attempt=1, exit_code=3),
            state(3, Phase.FAILED, "j1"),
            state(4, Phase.SUCCEEDED, "j2"),
            state(5, Phase.RUNNING, "j3"),
        ],
        waited=waited,
    )
    assert sorted(asked) == ["j1", "j2"]  # those it ended
    [ended] = result.ended_jobs
    assert ended == await store.get_job_detail("j1")
    assert ended.phase == Phase.FAILED and ended.exit_code == 3
    assert (await store.apply_events("s1", [state(6, Phase.SUCCEEDED, "j3")])).ended_jobs == []


async def test_resent_events_are_applied_once(store):
    await assigned_job(store)
    batch = [state(1, Phase.RUNNING), out(2, 0, b"abc")]
    await store.apply_events("s1", batch)
    again = await store.apply_events("s1", [*batch, out(3, 3, b"def")])
    assert again.stored_seq == 3
    assert await store.read_output("j1", 1, "stdout") == b"abcdef"
    job = await store.get_job("j1")
    assert [p.phase for p in job.runs[0].phases].count("running") == 1


async def test_output_only_appends_at_the_expected_offset(store):
    await assigned_job(store)
    await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING),
            out(2, 0, b"0123"),
            out(3, 2, b"23"),  # already stored: ignored
            out(4, 10, b"gap"),  # a gap: refused
            out(5, 4, b"45"),
            out(6, 0, b"012345678"),  # a replay from the start: only the new tail is kept
        ],
    )
    assert await store.read_output("j1", 1, "stdout") == b"012345678"


async def test_backward_transition_is_refused(store):
    await assigned_job(store)
    await store.apply_events("s1", [state(1, Phase.RUNNING), state(2, Phase.SUCCEEDED)])
    result = await store.apply_events("s1", [state(3, Phase.RUNNING)])
    assert result.unwanted == [RunRef("j1", 1)]
    assert (await store.get_job("j1")).phase == Phase.SUCCEEDED


async def test_events_for_runs_of_other_supervisors_are_refused(store):
    await assigned_job(store)
    other = Hello(supervisor_id="s2", name="s2", versions=["1.0"])
    await store.supervisor_connected(other)
    result = await store.apply_events("s2", [state(1, Phase.RUNNING)])
    assert result.unwanted == [RunRef("j1", 1)]
    assert (await store.get_job("j1")).phase == Phase.ASSIGNED


async def test_busy_rejection_requeues_the_job(store):
    await assigned_job(store)
    await store.apply_events(
        "s1",
        [
            JobErrorReport(seq=1, job_id="j1", attempt=1, kind=JobErrorKind.MAX_CONCURRENT_JOBS),
            state(2, Phase.REJECTED),
        ],
    )
    assert (await store.get_job("j1")).phase == Phase.QUEUED
    [again] = await store.assign([("j1", "s1")])
    assert again.attempt == 2


async def test_image_rejection_ends_the_job(store):
    await assigned_job(store)
    await store.apply_events(
        "s1",
        [
            JobErrorReport(
                seq=1, job_id="j1", attempt=1, kind=JobErrorKind.IMAGE_NOT_FOUND, description="gone"
            ),
            state(2, Phase.REJECTED),
        ],
    )
    job = await store.get_job("j1")
    assert job.phase == Phase.REJECTED and job.runs[0].error_kind == "image_not_found"


async def test_cancel(store):
    await store.create_job("queued", SPEC)
    assert (await store.request_cancel("queued")).phase == "canceled"
    assert await store.assign([("queued", "s1")]) == []
    made = await assigned_job(store, "busy")
    result = await store.request_cancel("busy")
    assert (result.supervisor_id, result.attempt) == ("s1", made.attempt)
    assert await store.request_cancel("missing") is None


async def test_sessions_and_seq_survive_a_reopen(tmp_path):
    path = tmp_path / "db.sqlite3"
    first = SQLiteStore(path)
    await first.open()
    await assigned_job(first)
    await first.apply_events("s1", [state(1, Phase.RUNNING), out(2, 0, b"kept")])
    await first.close()

    second = SQLiteStore(path)
    await second.open()
    connected = await second.supervisor_connected(HELLO)
    assert connected.session == 2 and connected.last_seq == 2
    assert [(r.job_id, r.phase) for r in await second.active_runs("s1")] == [("j1", "running")]
    assert await second.read_output("j1", 1, "stdout") == b"kept"
    await second.close()


async def test_concurrent_writes_are_grouped_and_all_durable(store):
    jobs = [f"j{i}" for i in range(200)]
    await asyncio.gather(*(store.create_job(j, SPEC) for j in jobs))
    queued = await store.queued_jobs(1000)
    assert {q.id for q in queued} == set(jobs)
    # FIFO within a priority: the queue order is the order of insertion.
    assert [q.seq for q in queued] == sorted(q.seq for q in queued)


async def test_a_failing_request_does_not_undo_its_group(store):
    await store.create_job("dup", SPEC)
    results = await asyncio.gather(
        store.create_job("dup", SPEC), store.create_job("fine", SPEC), return_exceptions=True
    )
    assert isinstance(results[0], Exception)
    assert results[1].phase == "queued"
    assert await store.get_job("fine") is not None


async def test_a_batch_is_refused_when_the_one_before_it_was_not_stored(store):
    await assigned_job(store)
    first = [state(1, Phase.RUNNING), out(2, 0, b"abc")]
    second = [out(3, 3, b"def")]
    # The session handed `first` over before `second`; `first` failed (not stored):
    with pytest.raises(BatchOutOfOrder):
        await store.apply_events("s1", second, after_seq=2)
    assert await store.read_output("j1", 1, "stdout") == b""
    # Sent again in order (as a reconnecting supervisor does), both are stored.
    await store.apply_events("s1", first)
    assert (await store.apply_events("s1", second, after_seq=2)).stored_seq == 3
    assert await store.read_output("j1", 1, "stdout") == b"abcdef"


async def test_lost_run_is_finalized(store):
    await assigned_job(store)
    await store.apply_events("s1", [state(1, Phase.RUNNING)])
    assert await store.end_run(RunRef("j1", 1), "lost", "host gone")
    assert (await store.get_job("j1")).phase == Phase.LOST
    assert not await store.end_run(RunRef("j1", 1), "lost", "twice")


async def test_runs_of_a_supervisor_gone_past_its_grace_are_lost(store):
    await assigned_job(store)
    await store.apply_events("s1", [state(1, Phase.RUNNING)])
    assert await store.lose_runs(0.0) == []  # still connected
    connected = await store.supervisor_connected(HELLO)
    await store.supervisor_disconnected("s1", connected.session)
    assert await store.lose_runs(3600.0) == []  # within its grace
    assert await store.lose_runs(0.0) == [RunRef("j1", 1)]
    job = await store.get_job("j1")
    assert job.phase == Phase.LOST and "silent" in job.runs[0].message
    assert await store.lose_runs(0.0) == []


async def test_a_restart_forgets_connections(store):
    await store.supervisor_connected(HELLO)
    await store.forget_connections()
    [sup] = await store.list_supervisors()
    assert not sup.connected
