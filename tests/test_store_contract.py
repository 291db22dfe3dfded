"""The store contract: what every implementation of switchboard.store.base.Store must do.

Each test runs against the SQLite store here, and against the PostgreSQL store in
tests/test_store_contract_postgres.py (the same tests, imported there with a `store`
fixture of its own: that module is of the `postgres` kind, this one `unit`). The tests
speak only the Store interface: no SQL, no private method, nothing of how a store keeps
its rows. The rules they see applied are switchboard.lifecycle's (restarts, busy retries,
cancels, concurrency): a store must write what those rules decide, not decide anything
itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from protocol.exceptions import JobErrorKind
from protocol.messages import (
    Hello,
    JobErrorReport,
    JobExit,
    JobFiles,
    JobStateChanged,
    Output,
    RefusedFile,
    RunRef,
)
from protocol.spec import (
    Backoff,
    Concurrency,
    FromJob,
    JobSpec,
    NoopBackend,
    Outputs,
    Parameter,
    RestartPolicy,
    WasmBackend,
)
from protocol.state import Phase
from switchboard.lifecycle import BUSY_RETRY_S
from switchboard.models import (
    Enrolment,
    GroupRoleSpec,
    GroupSpec,
    JobFilter,
    TestCase,
    TestCounts,
)
from switchboard.sealing import REDACTED
from switchboard.store.base import Store
from switchboard.store.errors import ArtifactMissing, ConnectRefused, QueueFull
from switchboard.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit


SPEC = JobSpec(name="t", backend=NoopBackend())
DIGEST = "sha256:" + "ab" * 32


def hello(supervisor_id: str = "s1", **kw) -> Hello:
    return Hello(
        supervisor_id=supervisor_id,
        name=supervisor_id,
        versions=["1.0"],
        backends=["noop", "wasm"],
        max_jobs=4,
        **kw,
    )


def state(seq: int, phase: Phase, job: str = "j1", attempt: int = 1, **kw) -> JobStateChanged:
    return JobStateChanged(seq=seq, job_id=job, attempt=attempt, phase=phase, **kw)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    made = SQLiteStore(tmp_path / "db.sqlite3")
    await made.open()
    yield made
    await made.close()


async def _running(store: Store, job_id: str = "j1", spec: JobSpec = SPEC, seq: int = 1):
    await store.create_job(job_id, spec)
    await store.supervisor_connected(hello())
    [run] = await store.assign([(job_id, "s1")])
    await store.apply_events("s1", [state(seq, Phase.RUNNING, job_id, run.attempt)])
    return run


# --- jobs: submit, place, claim ------------------------------------------------------------


async def test_submit_then_place_then_claim(store):
    [made] = await store.create_jobs([("j1", SPEC)], "alice", max_queued=10, owner="tok")
    assert made.phase == "queued" and made.stops == []
    job = await store.get_job("j1")
    assert job.phase == Phase.QUEUED and job.owner == "tok" and job.runs == []
    await store.supervisor_connected(hello())
    snapshot = await store.placement_snapshot(lambda fleet: 10)
    assert [s.id for s in snapshot.fleet] == ["s1"]
    assert [q.id for q in snapshot.queue] == ["j1"] and snapshot.next_backoff_end is None
    [run] = await store.assign([("j1", "s1")])
    assert (run.job_id, run.attempt, run.supervisor_id) == ("j1", 1, "s1")
    assert await store.assign([("j1", "s1")]) == []  # claimed once only
    assert await store.run_phase("j1", 1) == Phase.ASSIGNED
    assert [r.job_id for r in await store.active_runs("s1")] == ["j1"]
    assert (await store.get_supervisor("s1")).running == 1
    assert await store.queue_length() == 0


async def test_submit_and_assign_in_one_step_only_when_nothing_waits(store):
    await store.supervisor_connected(hello())
    made, runs = await store.create_and_assign([("j1", SPEC)], "a", 10, {"j1": "s1"})
    assert [r.job_id for r in runs] == ["j1"] and made[0].phase == "queued"
    await store.create_job("waiting", SPEC)
    _, runs = await store.create_and_assign([("j2", SPEC)], "a", 10, {"j2": "s1"})
    assert runs == []  # an older job waits ready: it comes first


async def test_queue_limits_refuse_all_or_nothing(store):
    await store.create_job("j0", SPEC)
    with pytest.raises(QueueFull):
        await store.create_jobs([("j1", SPEC), ("j2", SPEC)], "a", max_queued=2)
    assert await store.get_job("j1") is None and await store.queue_length() == 1
    with pytest.raises(QueueFull):
        await store.create_jobs([("j1", SPEC)], "a", 100, owner="t", max_queued_per_owner=0)


async def test_list_filter_and_delete(store):
    for n in range(3):
        await store.create_job(f"j{n}", SPEC)
    listed = await store.list_jobs(JobFilter(limit=2))
    assert [s.id for _, s in listed] == ["j2", "j1"]
    rest = await store.list_jobs(JobFilter(before_seq=listed[-1][0]))
    assert [s.id for _, s in rest] == ["j0"]
    assert await store.delete_job("j0") == "active"  # not ended
    await store.request_cancel("j0")
    assert await store.delete_job("j0") == "deleted"
    assert await store.delete_job("j0") == "absent"
    assert await store.get_job("j0") is None


# --- runs: phases written from the lifecycle's decisions -------------------------------------


async def test_a_run_and_its_history(store):
    await _running(store)
    await store.apply_events(
        "s1",
        [
            Output(seq=2, job_id="j1", attempt=1, stream="stdout", offset=0, data=b"hi"),
            JobExit(seq=3, job_id="j1", attempt=1, exit_code=3),
            state(4, Phase.FAILED, message="exit 3"),
        ],
    )
    job = await store.get_job("j1")
    assert job.phase == Phase.FAILED and job.exit_code == 3 and job.reason == "exit 3"
    assert [p.phase for p in job.runs[0].phases] == ["assigned", "running", "failed"]
    events = await store.job_events("j1")
    assert events[0].kind == "submitted"
    assert [e.message for e in events if e.kind == "run_phase"][-1] == "run 1: failed: exit 3"
    assert await store.read_output("j1", 1, "stdout") == b"hi"
    assert await store.job_events("nope") is None


async def test_a_device_consoles_stream_is_stored_like_stdout(store):
    """`console:<device>` (protocol 1.6) is one more stream: its own offsets, its own
    bytes, resends ignored, overlaps trimmed."""
    await _running(store)
    stream = "console:board-1"
    await store.apply_events(
        "s1",
        [
            Output(seq=2, job_id="j1", attempt=1, stream=stream, offset=0, data=b"boot\xff"),
            Output(seq=3, job_id="j1", attempt=1, stream="stdout", offset=0, data=b"out"),
            Output(seq=4, job_id="j1", attempt=1, stream=stream, offset=3, data=b"t\xff> "),
        ],
    )
    assert await store.read_output("j1", 1, stream) == b"boot\xff> "
    assert await store.read_output("j1", 1, stream, 4, 6) == b"\xff>"
    assert await store.read_output("j1", 1, "stdout") == b"out"
    assert await store.read_output("j1", 1, "console:board-2") == b""


async def test_active_run_refs_name_what_each_supervisor_holds(store):
    assert await store.active_run_refs([]) == {}
    assert await store.active_run_refs(["s1"]) == {"s1": set()}
    await _running(store)
    await store.create_job("j2", SPEC)
    await store.assign([("j2", "s1")])  # assigned, not yet running: held too
    both = await store.active_run_refs(["s1", "other"])
    assert both == {"s1": {RunRef("j1", 1), RunRef("j2", 1)}, "other": set()}
    await store.apply_events("s1", [state(2, Phase.SUCCEEDED)])
    assert await store.active_run_refs(["s1"]) == {"s1": {RunRef("j2", 1)}}
    many = [f"x{i}" for i in range(1200)] + ["s1"]  # more than one query's worth of ids
    refs = await store.active_run_refs(many)
    assert len(refs) == 1201 and refs["s1"] == {RunRef("j2", 1)}


async def test_a_restart_is_written_with_its_backoff(store):
    policy = RestartPolicy(
        policy="on_failure", max_restarts=1, backoff=Backoff(first_s=30, jitter="none")
    )
    spec = JobSpec(name="r", backend=NoopBackend(), restart=policy)
    await _running(store, spec=spec)
    before = time.time()
    await store.apply_events("s1", [state(2, Phase.FAILED)])
    job = await store.get_job("j1")
    assert job.phase == Phase.QUEUED and "restart 1 of 1 in 30.00s" in job.reason
    assert "restart_scheduled" in [e.kind for e in await store.job_events("j1")]
    snapshot = await store.placement_snapshot(lambda fleet: 10)
    assert snapshot.queue == [] and snapshot.next_backoff_end >= before + 30
    assert (await store.counts()).queued == {"backoff": 1}


async def test_a_busy_refusal_is_retried_not_restarted(store):
    await store.create_job("j1", SPEC)
    await store.supervisor_connected(hello())
    await store.assign([("j1", "s1")])
    at = time.time()
    await store.apply_events(
        "s1",
        [
            JobErrorReport(
                seq=1,
                job_id="j1",
                attempt=1,
                kind=JobErrorKind.MAX_CONCURRENT_JOBS,
                description="full",
            ),
            state(2, Phase.REJECTED, at=at),
        ],
    )
    job = await store.get_job("j1")
    assert job.phase == Phase.QUEUED and "restart" not in (job.reason or "")
    snapshot = await store.placement_snapshot(lambda fleet: 10)
    assert snapshot.next_backoff_end == pytest.approx(at + BUSY_RETRY_S)


async def test_cancel_queued_and_active(store):
    await store.create_job("q", SPEC)
    assert (await store.request_cancel("q", "bob")).phase == "canceled"
    assert (await store.get_job("q")).phase == Phase.CANCELED
    assert (await store.request_cancel("q")).phase == "canceled"  # again: nothing changes
    await _running(store, "a", seq=1)
    result = await store.request_cancel("a", "bob")
    assert (result.phase, result.supervisor_id, result.attempt) == ("running", "s1", 1)
    await store.apply_events("s1", [state(2, Phase.FAILED, job="a")])
    assert (await store.get_job("a")).phase == Phase.CANCELED  # a cancel beats the ending
    assert await store.request_cancel("missing") is None


@pytest.mark.parametrize("policy", ["queue", "drop_if_running", "replace"])
async def test_concurrency_policies(store, policy):
    keyed = JobSpec(name="k", backend=NoopBackend(), concurrency=Concurrency(key="deploy"))
    await _running(store, "holder", spec=keyed)
    spec = JobSpec(name="n", backend=NoopBackend(), concurrency=Concurrency("deploy", policy))
    [made] = await store.create_jobs([("new", spec)], "a", 10)
    holder = await store.get_job("holder")
    if policy == "drop_if_running":
        assert made.phase == "rejected" and "holder" in made.reason
        assert holder.cancel_requested is False
    elif policy == "replace":
        assert made.phase == "queued"
        assert [(s.job_id, s.supervisor_id) for s in made.stops] == [("holder", "s1")]
        assert holder.cancel_requested is True
    else:
        assert made.phase == "queued" and made.stops == [] and not holder.cancel_requested
    snapshot = await store.placement_snapshot(lambda fleet: 10)
    assert snapshot.busy_keys == frozenset({"deploy"})


async def test_switchboard_endings(store):
    await _running(store)
    await store.supervisor_disconnected("s1", 1)
    await asyncio.sleep(0.05)
    assert await store.lose_runs(grace_s=0.0) == [RunRef("j1", 1)]
    assert (await store.get_job("j1")).phase == Phase.LOST
    queued = JobSpec(name="q", backend=NoopBackend(), queue_timeout_s=0.01)
    await store.create_job("q", queued)
    await asyncio.sleep(0.05)
    expired = await store.expire(run_grace_s=0.0)
    assert expired.jobs == ["q"] and (await store.get_job("q")).phase == Phase.TIMED_OUT
    assert await store.end_run(RunRef("j1", 1), "failed", "late") is False  # already ended


async def test_events_are_stored_once_and_in_order(store):
    await _running(store)
    again = await store.apply_events("s1", [state(1, Phase.RUNNING), state(2, Phase.SUCCEEDED)])
    assert again.stored_seq == 2 and again.ended == [RunRef("j1", 1)]
    assert (await store.supervisor_connected(hello())).last_seq == 2
    assert [p.phase for p in (await store.get_job("j1")).runs[0].phases].count("running") == 1


# --- tokens, supervisors, connections ----------------------------------------------------------


async def test_tokens(store):
    digest = hashlib.sha256(b"secret").digest()
    await store.add_token("t1", "admin", "me", digest)
    assert (await store.find_token(digest)).id == "t1"
    assert [t.id for t in await store.list_tokens()] == ["t1"]
    assert await store.revoke_token("t1") is True
    assert await store.find_token(digest) is None  # at once, whatever a store remembers
    assert (await store.list_tokens())[0].revoked is True
    assert await store.revoke_token("nope") is False


async def test_enrolment_and_rotation(store):
    enrol = Enrolment("host-1", hashlib.sha256(b"cred").digest(), "host one")
    await store.supervisor_connected(hello(), enrol=enrol)
    assert (await store.find_token(enrol.digest)).supervisor_id == "s1"
    with pytest.raises(ConnectRefused) as refused:
        await store.supervisor_connected(hello(), enrol=Enrolment("x", b"y" * 32, "x"))
    assert refused.value.why == "enrolled"
    rotated = hashlib.sha256(b"new").digest()
    await store.add_token("host-2", "supervisor", "r", rotated, "s1", replace_bound=True)
    assert await store.find_token(enrol.digest) is None
    assert await store.unenroll("s1") == ["host-2"]
    assert await store.find_token(rotated) is None
    assert await store.unenroll("unknown") is None
    with pytest.raises(ConnectRefused):
        await store.supervisor_connected(hello("s2"), token_id="host-2")


async def test_supervisor_records_and_connections(store):
    first = await store.supervisor_connected(hello(labels={"os": "linux"}))
    second = await store.supervisor_connected(hello())
    assert second.session == first.session + 1
    await store.supervisor_disconnected("s1", first.session)  # superseded: nothing changes
    assert (await store.get_supervisor("s1")).connected is True
    await store.supervisor_disconnected("s1", second.session, "bye")
    records = await store.connection_records("s1", 10)
    assert [r.session for r in records] == [second.session, first.session]
    assert records[0].reason == "bye" and records[0].disconnected_at is not None
    writes = store.supervisor_writes
    assert await store.set_drained("s1", True) is True
    assert await store.set_operator_labels("s1", {"rack": "a"}) is True
    assert store.supervisor_writes > writes
    view = await store.get_supervisor("s1")
    assert view.drained and view.labels == {"rack": "a"} and not view.connected
    assert await store.set_drained("nope", True) is False
    await store.forget_connections()
    assert (await store.list_supervisors())[0].connected is False


async def test_dispatch_pause(store):
    assert await store.dispatch_paused() is False
    await store.set_dispatch_paused(True)
    assert await store.dispatch_paused() is True


# --- artifacts, secrets, retention, views ------------------------------------------------------


async def test_artifacts(store):
    assert (await store.add_artifact(DIGEST, 10, "t1", quota=5)).outcome == "full"
    assert (await store.add_artifact(DIGEST, 10, "t1")).outcome == "added"
    assert (await store.add_artifact(DIGEST, 10, "t2")).outcome == "exists"
    artifact = await store.get_artifact(DIGEST)
    assert (artifact.size, artifact.uploaded_by) == (10, "t1")
    assert _exactly(await store.stored_artifact_bytes(), 10)
    missing = JobSpec(name="w", backend=WasmBackend(module="sha256:" + "cd" * 32))
    with pytest.raises(ArtifactMissing):
        await store.create_job("w0", missing)
    await store.create_job("w1", JobSpec(name="w", backend=WasmBackend(module=DIGEST)))
    deleted = await store.delete_artifact(DIGEST)
    assert (deleted.outcome, deleted.needed_by) == ("in_use", ["w1"])
    await store.request_cancel("w1")
    assert await store.delete_artifact(DIGEST, unused_before=0.0) == type(deleted)("used_lately")
    assert await store.unused_artifacts(time.time() + 1, 10) == [DIGEST]
    assert (await store.delete_artifact(DIGEST)).outcome == "deleted"
    assert (await store.delete_artifact(DIGEST)).outcome == "absent"


def _exactly(value: object, wanted: int) -> bool:
    """`value` is the int `wanted`, not a number that only compares equal (a Decimal from a
    SQL sum shows as a string in JSON)."""
    return type(value) is int and value == wanted


async def test_secret_values_are_opened_only_for_the_start(store):
    spec = JobSpec(
        name="s", backend=NoopBackend(), parameters={"TOKEN": Parameter("hunter2", secret=True)}
    )
    await store.create_job("j1", spec)
    assert (await store.get_job("j1")).spec.parameters["TOKEN"].value == REDACTED
    await store.supervisor_connected(hello())
    [run] = await store.assign([("j1", "s1")])
    assert run.spec.parameters["TOKEN"].value == "hunter2"
    [active] = await store.active_runs("s1")
    assert active.spec.parameters["TOKEN"].value == "hunter2"  # still assigned: resendable


async def test_retention_reads_and_drops_output(store):
    await _running(store)
    chunks = [
        Output(seq=2 + n, job_id="j1", attempt=1, stream="stdout", offset=n, data=b"x")
        for n in range(5)
    ]
    await store.apply_events("s1", chunks)
    assert await store.ended_jobs(limit=10) == []
    assert await store.drop_output("j1", 10) == 0  # not ended: kept
    await store.apply_events("s1", [state(20, Phase.SUCCEEDED)])
    assert _exactly(await store.stored_output_bytes(), 5)
    assert await store.ended_jobs(with_output=True, limit=10) == ["j1"]
    assert await store.drop_output("j1", 2) == 2
    assert await store.drop_output("j1", 10, reason="old") == 3
    assert await store.stored_output_bytes() == 0
    assert await store.ended_jobs(with_output=True, limit=10) == []
    assert "output_removed" in [e.kind for e in await store.job_events("j1")]


async def test_views(store):
    seen = []
    store.on_write(lambda: seen.append(1))
    start = await store.latest_job_change()
    await store.create_job("j1", SPEC)
    assert seen
    changes = await store.job_changes(start, 10)
    assert [c.job_id for c in changes] == ["j1"]
    await store.prune_job_changes(0)
    overview = await store.overview(time.time(), 5, 5)
    assert sum(q.count for q in overview.queue) == 1 and len(overview.finished) == 5
    await store.set_unschedulable({"j1": "no such host"})
    assert (await store.get_job("j1")).unschedulable == "no such host"
    assert await store.queued_jobs(10) == []
    assert [q.id for q in await store.queued_jobs(10, marked=True)] == ["j1"]


# --- test reports ------------------------------------------------------------------------


def _case(name: str, result: str = "passed", message: str | None = None) -> TestCase:
    return TestCase(suite="s", classname="c", name=name, result=result, message=message)


async def test_test_cases_are_stored_per_report_and_listed_in_pages(store):
    assert not await store.add_test_cases("j1", 1, "out/a.xml", [_case("x")])  # no such run
    await _running(store)
    assert await store.test_summary("j1") is None
    empty = await store.test_cases("j1")
    assert empty is not None and empty.attempt is None and empty.items == []
    assert await store.test_cases("nope") is None
    cases = [_case(f"t{n}", "failed" if n % 3 == 0 else "passed", f"m{n}") for n in range(10)]
    assert await store.add_test_cases("j1", 1, "out/a.xml", cases)
    assert await store.add_test_cases("j1", 1, "out/b.xml", [_case("s", "skipped")])
    assert await store.add_test_cases("j1", 1, "out/c.xml", [])  # a report with no case
    summary = await store.test_summary("j1")
    assert summary == TestCounts(passed=6, failed=4, error=0, skipped=1, total=11)
    assert all(type(n) is int for n in msgspec.structs.astuple(summary))
    first = await store.test_cases("j1", limit=4)
    assert first.attempt == 1 and [c.name for c in first.items] == ["t0", "t1", "t2", "t3"]
    assert first.items[0].report == "out/a.xml" and first.items[0].message == "m0"
    assert first.next_after == first.items[-1].id
    names, after = [], None
    while True:
        page = await store.test_cases("j1", limit=4, after=after)
        names += [c.name for c in page.items]
        if page.next_after is None:
            break
        after = page.next_after
    assert names == [*(f"t{n}" for n in range(10)), "s"]
    failed = await store.test_cases("j1", result="failed", limit=3)
    assert [c.name for c in failed.items] == ["t0", "t3", "t6"]
    rest = await store.test_cases("j1", result="failed", limit=3, after=failed.next_after)
    assert [c.name for c in rest.items] == ["t9"] and rest.next_after is None
    assert all(c.result == "failed" for c in failed.items + rest.items)
    # The same report stored again replaces its cases: none counted twice.
    assert await store.add_test_cases("j1", 1, "out/a.xml", [_case("again", "error")])
    assert await store.test_summary("j1") == TestCounts(
        passed=0, failed=0, error=1, skipped=1, total=2
    )


async def test_the_summary_is_of_the_latest_run_with_a_report(store):
    policy = RestartPolicy(
        policy="on_failure", max_restarts=2, backoff=Backoff(first_s=0, jitter="none")
    )
    await _running(store, spec=JobSpec(name="r", backend=NoopBackend(), restart=policy))
    await store.add_test_cases("j1", 1, "r.xml", [_case("a", "failed")])
    await store.apply_events("s1", [state(2, Phase.FAILED)])
    [second] = await store.assign([("j1", "s1")])
    assert second.attempt == 2
    # The second run has no report (yet): the first one's counts stand.
    assert await store.test_summary("j1") == TestCounts(failed=1, total=1)
    await store.add_test_cases("j1", 2, "r.xml", [_case("a"), _case("b")])
    assert await store.test_summary("j1") == TestCounts(passed=2, total=2)
    assert [c.name for c in (await store.test_cases("j1")).items] == ["a", "b"]
    older = await store.test_cases("j1", attempt=1)
    assert older.attempt == 1 and [(c.name, c.result) for c in older.items] == [("a", "failed")]


async def test_jobs_read_together_are_each_as_read_alone(store):
    """Many jobs read at once (the ended among some, the ended among the changes: what
    waits answer with) are each what get_job_detail shows: runs, phase history, test and
    file counts. A job still running is left out; one that does not exist is named."""
    policy = RestartPolicy(
        policy="on_failure", max_restarts=1, backoff=Backoff(first_s=0, jitter="none")
    )
    mark = await store.latest_job_change()
    await _running(store, spec=JobSpec(name="r", backend=NoopBackend(), restart=policy))
    await store.add_test_cases("j1", 1, "r.xml", [_case("a", "failed")])
    await store.apply_events("s1", [state(2, Phase.FAILED)])
    await store.assign([("j1", "s1")])
    await store.apply_events("s1", [state(3, Phase.RUNNING, attempt=2)])
    await store.add_test_cases("j1", 2, "r.xml", [_case("a"), _case("b", "skipped")])
    await store.apply_events(
        "s1",
        [
            JobFiles(
                seq=4,
                job_id="j1",
                attempt=2,
                refused=[RefusedFile(path="core", reason="too big")],
                refused_unlisted=2,
            ),
            JobExit(seq=5, job_id="j1", attempt=2, exit_code=0),
            state(6, Phase.SUCCEEDED, attempt=2),
        ],
    )
    for job_id in ("j2", "j3"):
        await store.create_job(job_id, SPEC)
        await store.assign([(job_id, "s1")])
    await store.apply_events("s1", [state(7, Phase.FAILED, "j2"), state(8, Phase.RUNNING, "j3")])

    alone = {job_id: await store.get_job_detail(job_id) for job_id in ("j1", "j2")}
    assert alone["j1"].tests == TestCounts(passed=1, skipped=1, total=2)
    assert alone["j1"].files is not None and alone["j1"].files.refused == 3
    assert [len(run.phases) for run in alone["j1"].runs] == [3, 3]
    ended, missing = await store.ended_job_details(["j3", "j2", "nope", "j1"])
    assert {job.id: job for job in ended} == alone
    assert missing == ["nope"]
    changes, among = await store.ended_among_changes(
        mark, 1000, lambda changes: sorted({c.job_id for c in changes})
    )
    assert {c.job_id for c in changes} == {"j1", "j2", "j3"}
    assert {job.id: job for job in among} == alone


async def test_deleting_a_job_deletes_its_test_cases(store):
    await _running(store)
    await store.add_test_cases("j1", 1, "r.xml", [_case("a")])
    await store.apply_events("s1", [state(2, Phase.SUCCEEDED)])
    assert await store.delete_job("j1") == "deleted"
    assert await store.test_summary("j1") is None
    # A new job under the same id starts with none of the old one's cases.
    await _running(store, seq=3)
    assert await store.test_summary("j1") is None
    assert (await store.test_cases("j1")).items == []


async def test_a_large_report_is_stored_whole_and_replaced_whole(store):
    await _running(store)
    many = [_case(f"t{n}", "failed" if n % 1000 == 0 else "passed") for n in range(5001)]
    assert await store.add_test_cases("j1", 1, "big.xml", many)
    assert (await store.test_summary("j1")).total == 5001
    failed = await store.test_cases("j1", result="failed", limit=10)
    assert [c.name for c in failed.items] == [f"t{n}" for n in range(0, 5001, 1000)]
    first = await store.test_cases("j1")  # 100 by default
    page = await store.test_cases("j1", limit=1000, after=first.next_after)
    assert page.items[0].name == "t100" and len(page.items) == 1000
    assert await store.add_test_cases("j1", 1, "big.xml", many[:3])
    assert (await store.test_summary("j1")).total == 3
    assert [c.name for c in (await store.test_cases("j1", limit=10)).items] == ["t0", "t1", "t2"]


async def test_a_chained_job_waits_then_is_rejected_when_its_file_never_came(store):
    build = JobSpec(name="build", backend=NoopBackend(), outputs=Outputs(paths=["*.bin"]))
    chained = JobSpec(
        name="test",
        backend=NoopBackend(),
        inputs={"fw.bin": FromJob(from_job="b1", path="fw.bin")},
    )
    await store.create_job("b1", build)
    await store.create_job("t1", chained)
    assert [j.id for j in await store.queued_jobs(10)] == ["b1"]  # t1 waits, unplaced
    writes: list[None] = []
    store.on_write(lambda: writes.append(None))
    assert await store.resolve_chains() == (0, 0, 1)
    assert writes == []  # nothing due: a read
    await store.request_cancel("b1")
    assert await store.resolve_chains() == (0, 1, 0)
    job = await store.get_job("t1")
    assert job is not None and job.phase == Phase.REJECTED
    assert job.reason is not None and "without keeping a file 'fw.bin'" in job.reason


# --- job groups: held, placed all or none, stopped by an essential role ---------------------


def _group(*roles: tuple[str, bool]) -> GroupSpec:
    return GroupSpec(
        name="rig",
        roles=[
            GroupRoleSpec(role=name, spec=SPEC, essential=essential) for name, essential in roles
        ],
    )


async def test_a_group_waits_held_out_of_the_queue_until_placed_whole(store):
    made = await store.create_group(
        "g1", _group(("dut", True), ("meter", False)), ["j1", "j2"], "alice", 10, owner="tok"
    )
    assert (made.id, made.state, made.owner) == ("g1", "waiting", "tok")
    assert [(r.role, r.job_id, r.essential, r.phase) for r in made.roles] == [
        ("dut", "j1", True, Phase.QUEUED),
        ("meter", "j2", False, Phase.QUEUED),
    ]
    assert (await store.get_job("j1")).group == "g1"
    await store.supervisor_connected(hello())
    snapshot = await store.placement_snapshot(lambda fleet: 10)
    assert snapshot.queue == []  # held for the group: never placed alone
    [(group_id, needs)] = await store.waiting_groups()
    assert group_id == "g1" and [(n.role, n.job_id, n.essential) for n in needs] == [
        ("dut", "j1", True),
        ("meter", "j2", False),
    ]
    # One run can't be had (its job is no longer queued): nothing at all is written.
    assert await store.assign_group("g1", [("j1", "s1"), ("gone", "s1")]) == []
    assert (await store.get_job("j1")).phase == Phase.QUEUED
    assert (await store.get_supervisor("s1")).running == 0
    runs = await store.assign_group("g1", [("j1", "s1"), ("j2", "s1")])
    assert [(r.job_id, r.supervisor_id) for r in runs] == [("j1", "s1"), ("j2", "s1")]
    assert await store.waiting_groups() == []
    shown = await store.get_group("g1")
    assert shown.state == "running" and shown.placed_at is not None
    assert [g.id for g in await store.list_groups()] == ["g1"]
    assert await store.get_group("nope") is None


async def test_an_essential_roles_failure_cancels_the_others(store):
    await store.create_group("g1", _group(("dut", True), ("meter", True)), ["j1", "j2"], "a", 10)
    await store.supervisor_connected(hello())
    await store.assign_group("g1", [("j1", "s1"), ("j2", "s1")])
    await store.apply_events("s1", [state(1, Phase.RUNNING, "j1"), state(2, Phase.RUNNING, "j2")])
    swept = await store.sweep_groups()
    assert swept.stops == [] and swept.stopped == [] and swept.open
    await store.apply_events("s1", [state(3, Phase.FAILED, "j1")])
    swept = await store.sweep_groups()
    assert [(s.job_id, s.supervisor_id) for s in swept.stops] == [("j2", "s1")]
    assert swept.stopped == [("g1", "essential role 'dut' of group g1 ended failed")]
    group = await store.get_group("g1")
    assert group.state == "stopping" and "'dut'" in group.reason
    assert (await store.sweep_groups()).stops == []  # stopped once
    await store.apply_events("s1", [state(4, Phase.CANCELED, "j2")])
    swept = await store.sweep_groups()
    assert not swept.open
    ended = await store.get_group("g1")
    assert ended.state == "failed" and ended.ended_at is not None
    assert "essential role 'dut'" in (await store.get_job("j2")).reason


async def test_a_waiting_groups_essential_role_canceled_cancels_the_rest(store):
    await store.create_group("g1", _group(("a", True), ("b", False)), ["j1", "j2"], "a", 10)
    await store.request_cancel("j1")
    swept = await store.sweep_groups()
    assert swept.stops == [] and not swept.open
    assert (await store.get_job("j2")).phase == Phase.CANCELED
    assert (await store.get_group("g1")).state == "canceled"
    assert await store.waiting_groups() == []


async def test_a_group_counts_against_the_queue_all_or_none(store):
    with pytest.raises(QueueFull):
        await store.create_group("g1", _group(("a", True), ("b", True)), ["j1", "j2"], "a", 1)
    assert await store.get_group("g1") is None and await store.get_job("j1") is None
