"""Chained jobs: an input naming an earlier job's output file. The pure decision
(switchboard.chains) and the store: a chained job waits out of placement, saying why; it is
resolved to the file's digest once the job it names has ended (at submission if that job
has ended already), and rejected, saying which file never came, when it can't be; the spec
grammar and the start_job builder refuse what only a switchboard may resolve."""

from __future__ import annotations

import msgspec
import pytest

from protocol import codec
from protocol.messages import JobFiles, OutputFile, start_job
from protocol.spec import FromJob, JobSpec, NoopBackend, Outputs
from protocol.state import Phase
from switchboard import chains
from switchboard.store.errors import InputUnavailable
from switchboard.store.sqlite import SQLiteStore
from tests.store_setup import HELLO, state

pytestmark = pytest.mark.unit

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
BUILD = JobSpec(name="build", backend=NoopBackend(), outputs=Outputs(paths=["build/*"]))


def chained(*refs: tuple[str, str, str], **digests: str) -> JobSpec:
    inputs: dict[str, str | FromJob] = {p: FromJob(from_job=j, path=f) for p, j, f in refs}
    inputs.update(digests)
    return JobSpec(name="test", backend=NoopBackend(), inputs=inputs)


# --- the decision ---------------------------------------------------------------------------


def test_a_chain_waits_for_a_job_not_ended_then_takes_its_file():
    spec = chained(("fw.bin", "b1", "build/fw.bin"), ("t/", "b2", "tests.tar"), data=A)
    running = chains.Source(Phase.RUNNING, {})
    done1 = chains.Source(Phase.SUCCEEDED, {"build/fw.bin": A})
    done2 = chains.Source(Phase.FAILED, {"tests.tar": B})
    assert chains.resolve(spec, {"b1": done1, "b2": running}).waiting_for == "b2"
    resolved = chains.resolve(spec, {"b1": done1, "b2": done2}).spec
    assert resolved is not None and resolved.inputs == {"fw.bin": A, "t/": B, "data": A}
    assert resolved.chained_inputs() == {} and resolved.input_digests() == resolved.inputs
    assert chains.sources_of(spec) == ["b1", "b2"]
    message = chains.resolved_message(spec, resolved)
    assert "'fw.bin' <- job b1 'build/fw.bin'" in message and B in message


def test_a_missing_job_or_file_is_a_problem_that_names_it():
    spec = chained(("fw.bin", "b1", "build/fw.bin"))
    assert "job b1 does not exist" in (chains.resolve(spec, {"b1": None}).problem or "")
    ended = chains.Source(Phase.FAILED, {"build/other.bin": A})
    problem = chains.resolve(spec, {"b1": ended}).problem or ""
    assert "inputs['fw.bin']" in problem and "ended failed" in problem
    assert "'build/fw.bin'" in problem


def test_the_spec_grammar_and_the_builder():
    spec = codec.decode_job_spec(
        b'{"name":"t","backend":{"kind":"noop"},'
        b'"inputs":{"fw.bin":{"from_job":"b1","path":"build/fw.bin"},"d":"' + A.encode() + b'"}}'
    )
    assert spec.chained_inputs() == {"fw.bin": FromJob(from_job="b1", path="build/fw.bin")}
    for bad in (
        b'{"from_job":"b1","path":"../etc/passwd"}',
        b'{"from_job":"no spaces","path":"a"}',
        b'{"from_job":"b1"}',
        b'{"from_job":"b1","path":"a","extra":1}',
        b'"not-a-digest"',
    ):
        body = b'{"name":"t","backend":{"kind":"noop"},"inputs":{"x":' + bad + b"}}"
        with pytest.raises(msgspec.ValidationError):
            codec.decode_job_spec(body)
    # Only a switchboard resolves a chain: the builder refuses to send one unresolved,
    # while the size check measures it as resolved.
    with pytest.raises(ValueError, match="only a switchboard resolves"):
        start_job("j", 1, spec)
    codec.check_start_job_fits(spec)


# --- the store ------------------------------------------------------------------------------


async def _build_ended(store: SQLiteStore, job_id: str, files: dict[str, str], end: Phase):
    await store.create_job(job_id, BUILD)
    await store.supervisor_connected(HELLO)
    await store.assign([(job_id, "s1")])
    listed = [OutputFile(path=p, size=10, digest=d) for p, d in files.items()]
    events = [
        state(1, Phase.RUNNING, job_id),
        JobFiles(seq=2, job_id=job_id, attempt=1, files=listed),
    ]
    await store.apply_events("s1", [*events, state(3, end, job_id)])


async def test_a_chained_job_waits_unplaced_then_is_resolved(store):
    await store.add_artifact(A, 10, None, None)
    await store.create_job("b1", BUILD)
    made = await store.create_job("t1", chained(("fw.bin", "b1", "build/fw.bin")))
    assert made.phase == "queued"
    job = await store.get_job("t1")
    assert job is not None and job.unschedulable == chains.waiting_reason("b1")
    assert [j.id for j in await store.queued_jobs(10)] == ["b1"]
    # A dispatch pass's note about placement never clears the wait.
    await store.set_unschedulable({"t1": None})
    assert [j.id for j in await store.queued_jobs(10)] == ["b1"]
    assert await store.queued_jobs(10, marked=True) == []
    writes: list[None] = []
    store.on_write(lambda: writes.append(None))
    assert await store.resolve_chains() == (0, 0, 1)  # b1 has not ended
    assert writes == []  # a sweep with nothing to do is a read: passes meanwhile write nothing

    await store.supervisor_connected(HELLO)
    await store.assign([("b1", "s1")])
    files = [OutputFile(path="build/fw.bin", size=10, digest=A)]
    await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING, "b1"),
            JobFiles(seq=2, job_id="b1", attempt=1, files=files),
            state(3, Phase.SUCCEEDED, "b1"),
        ],
    )
    assert await store.resolve_chains() == (1, 0, 0)
    job = await store.get_job("t1")
    assert job is not None and job.unschedulable is None and job.spec.inputs == {"fw.bin": A}
    assert [j.id for j in await store.queued_jobs(10)] == ["t1"]
    events = await store.job_events("t1")
    assert events is not None and any(e.kind == "inputs_resolved" for e in events)
    # The file is the chained job's input now: held while that job exists.
    assert await store.delete_job("b1") == "deleted"
    assert (await store.delete_artifact(A)).outcome == "in_use"


async def test_a_job_that_ended_without_the_file_rejects_its_chain(store):
    await store.create_job("b1", BUILD)
    await store.create_job("t1", chained(("fw.bin", "b1", "build/fw.bin")))
    await store.request_cancel("b1")
    assert await store.resolve_chains() == (0, 1, 0)
    job = await store.get_job("t1")
    assert job is not None and job.phase == Phase.REJECTED
    assert job.reason is not None and "job b1 ended canceled" in job.reason
    assert "'build/fw.bin'" in job.reason
    events = await store.job_events("t1")
    assert events is not None and events[-1].kind == "inputs_unavailable"


async def test_a_job_ended_already_resolves_or_refuses_at_submission(store):
    await store.add_artifact(A, 10, None, None)
    await _build_ended(store, "b1", {"build/fw.bin": A}, Phase.FAILED)
    made = await store.create_job("t1", chained(("fw.bin", "b1", "build/fw.bin")))
    job = await store.get_job("t1")
    assert made.phase == "queued" and job is not None and job.spec.inputs == {"fw.bin": A}
    assert job.unschedulable is None and [j.id for j in await store.queued_jobs(10)] == ["t1"]
    for ref, why in (
        (("x", "b1", "build/none.bin"), "without keeping a file 'build/none.bin'"),
        (("x", "nope", "a"), "job nope does not exist"),
    ):
        with pytest.raises(InputUnavailable, match=why):
            await store.create_jobs([("ok", BUILD), ("t2", chained(ref))], "", 100)
        assert await store.get_job("ok") is None  # the batch is stored whole or not at all


async def test_a_canceled_waiting_job_and_a_deleted_source(store):
    await store.create_job("b1", BUILD)
    await store.create_job("t1", chained(("fw.bin", "b1", "build/fw.bin")))
    await store.create_job("t2", chained(("fw.bin", "b1", "build/fw.bin")))
    await store.request_cancel("t1")
    await store.request_cancel("b1")
    # Ended, and deleted before the sweep saw it end.
    assert await store.delete_job("b1") == "deleted"
    assert await store.resolve_chains() == (0, 1, 0)
    job = await store.get_job("t2")
    assert job is not None and job.phase == Phase.REJECTED
    assert job.reason is not None and "job b1 does not exist" in job.reason
    canceled = await store.get_job("t1")
    assert canceled is not None and canceled.phase == Phase.CANCELED
