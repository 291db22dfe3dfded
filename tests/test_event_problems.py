"""Every event the switchboard does not take as sent is named: the store hands back one
EventProblem per such event (docs/protocol.md §6.5), the Ack of a 1.2 session carries them,
and an older session's Ack stays as it was."""

from __future__ import annotations

import pytest

from protocol import codec
from protocol.connection import Connection, Role
from protocol.exceptions import JobErrorKind, ProblemCode
from protocol.messages import Ack, EventProblem, Hello, JobErrorReport, JobExit, RunRef
from protocol.state import Phase
from switchboard.store.sqlite import SQLiteStore
from tests.store_setup import assigned_job, out, state

pytestmark = pytest.mark.unit


def codes(result) -> list[tuple[int, ProblemCode]]:
    return [(p.seq, p.code) for p in result.problems]


async def test_a_clean_run_has_no_problems(store):
    await assigned_job(store)
    result = await store.apply_events(
        "s1",
        [
            state(1, Phase.INITIALIZING, stage="accepted"),
            state(2, Phase.INITIALIZING, stage="starting"),
            state(3, Phase.RUNNING),
            out(4, 0, b"hi\n"),
            JobExit(seq=5, job_id="j1", attempt=1, exit_code=0),
            state(6, Phase.SUCCEEDED),
        ],
    )
    assert result.problems == []


async def test_disallowed_phase_changes_are_named_and_dropped(store):
    await assigned_job(store)
    result = await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING),
            state(2, Phase.INITIALIZING),  # backwards
            state(3, Phase.RUNNING),  # twice
            state(4, Phase.QUEUED),  # only the switchboard decides
            state(5, Phase.LOST),
        ],
    )
    assert codes(result) == [
        (2, ProblemCode.INVALID_TRANSITION),
        (3, ProblemCode.INVALID_TRANSITION),
        (4, ProblemCode.PHASE_NOT_REPORTABLE),
        (5, ProblemCode.PHASE_NOT_REPORTABLE),
    ]
    assert "running -> initializing" in result.problems[0].reason
    job = await store.get_job("j1")
    assert job.phase == Phase.RUNNING
    assert [p.phase for p in job.runs[0].phases] == ["assigned", "running"]


async def test_events_after_the_end_are_dropped_and_the_run_stopped(store):
    await assigned_job(store)
    await store.apply_events("s1", [state(1, Phase.RUNNING), state(2, Phase.SUCCEEDED)])
    result = await store.apply_events(
        "s1",
        [
            out(3, 0, b"late"),
            JobExit(seq=4, job_id="j1", attempt=1, exit_code=9),
            state(5, Phase.FAILED),
        ],
    )
    assert codes(result) == [
        (3, ProblemCode.RUN_ENDED),
        (4, ProblemCode.RUN_ENDED),
        (5, ProblemCode.RUN_ENDED),
    ]
    assert result.unwanted and set(result.unwanted) == {RunRef("j1", 1)}
    assert await store.read_output("j1", 1, "stdout") == b""
    job = await store.get_job("j1")
    assert job.phase == Phase.SUCCEEDED and job.exit_code is None


async def test_the_answer_to_a_repeated_start_is_not_a_problem(store):
    await assigned_job(store)
    await store.apply_events("s1", [state(1, Phase.RUNNING), state(2, Phase.SUCCEEDED)])
    result = await store.apply_events(
        "s1",
        [
            JobErrorReport(seq=3, job_id="j1", attempt=1, kind=JobErrorKind.JOB_ALREADY_EXISTS),
            state(4, Phase.REJECTED),
        ],
    )
    assert result.problems == [] and result.unwanted == []
    assert (await store.get_job("j1")).phase == Phase.SUCCEEDED


async def test_a_lost_run_keeps_what_its_program_did(store):
    await assigned_job(store)
    await store.apply_events("s1", [state(1, Phase.RUNNING), out(2, 0, b"before ")])
    assert await store.end_run(RunRef("j1", 1), "lost", "host gone")
    result = await store.apply_events(
        "s1",
        [
            out(3, 7, b"after"),
            JobExit(seq=4, job_id="j1", attempt=1, exit_code=0),
            state(5, Phase.SUCCEEDED),
        ],
    )
    assert codes(result) == [(5, ProblemCode.RUN_ENDED)]
    assert await store.read_output("j1", 1, "stdout") == b"before after"
    job = await store.get_job("j1")
    assert job.phase == Phase.LOST and job.runs[0].exit_code == 0


async def test_events_for_runs_not_assigned_here(store):
    await assigned_job(store)
    other = Hello(supervisor_id="s2", name="s2", versions=["1.2"])
    await store.supervisor_connected(other)
    result = await store.apply_events(
        "s2", [state(1, Phase.RUNNING), state(2, Phase.RUNNING, job="nope")]
    )
    assert codes(result) == [(1, ProblemCode.UNKNOWN_RUN), (2, ProblemCode.UNKNOWN_RUN)]
    assert "assigned to another supervisor" in result.problems[0].reason
    assert "does not exist" in result.problems[1].reason
    assert set(result.unwanted) == {RunRef("j1", 1), RunRef("nope", 1)}


async def test_an_output_gap_is_named_and_later_chunks_still_count(store):
    await assigned_job(store)
    result = await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING),
            out(2, 0, b"0123"),
            out(3, 10, b"gap"),
            out(4, 4, b"45"),
        ],
    )
    assert codes(result) == [(3, ProblemCode.OUTPUT_GAP)]
    assert "offset 10 is past the 4 bytes" in result.problems[0].reason
    assert await store.read_output("j1", 1, "stdout") == b"012345"


async def test_a_seq_jump_is_stored_and_named(store):
    await assigned_job(store)
    result = await store.apply_events("s1", [state(1, Phase.RUNNING), out(5, 0, b"x")])
    assert codes(result) == [(5, ProblemCode.SEQ_GAP)]
    assert "2..4 never arrived" in result.problems[0].reason
    assert result.stored_seq == 5
    assert await store.read_output("j1", 1, "stdout") == b"x"


async def test_output_past_the_cap_is_named(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3", max_run_output=4)
    await store.open()
    try:
        await assigned_job(store)
        result = await store.apply_events(
            "s1", [state(1, Phase.RUNNING), out(2, 0, b"012345"), out(3, 6, b"67")]
        )
    finally:
        await store.close()
    assert codes(result) == [(2, ProblemCode.OUTPUT_CAPPED), (3, ProblemCode.OUTPUT_CAPPED)]
    assert "4 of 6 bytes stored" in result.problems[0].reason
    assert "0 of 2 bytes stored" in result.problems[1].reason


@pytest.mark.parametrize(("version", "told"), [("1.2", True), ("1.1", False), ("1.0", False)])
def test_the_ack_names_problems_to_a_peer_that_speaks_1_2(version: str, told: bool) -> None:
    conn = Connection(Role.SWITCHBOARD)
    conn.receive(codec.encode(Hello(supervisor_id="h", name="h", versions=[version])))
    conn.welcome(
        session=1, stored_seq=0, heartbeat_interval_s=5, heartbeat_timeout_s=20, enrolled=False
    )
    problem = EventProblem(3, ProblemCode.OUTPUT_GAP, "offset 9 is past the 0 bytes")
    frame = conn.acknowledge(3, [problem])
    assert frame is not None
    ack = codec.decode_from_switchboard(frame)
    assert isinstance(ack, Ack) and ack.seq == 3
    assert ack.problems == ([problem] if told else [])
    if not told:
        assert b"problems" not in frame  # byte for byte what a 1.1 peer always got
