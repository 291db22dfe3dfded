"""Job bookkeeping shared by every backend, driven through the noop backend."""

from __future__ import annotations

import asyncio

import pytest

from protocol.exceptions import JobError, JobErrorKind
from protocol.messages import JobErrorReport, JobExit, JobStateChanged, StartJob, StopJob
from protocol.spec import NoopBackend as NoopSpec
from protocol.spec import WasmBackend as WasmSpec
from supervisor.backends.noop import NoopBackend
from supervisor.jobs import BackendSupervisor
from tests.recording import RecordingConnector

pytestmark = pytest.mark.unit


def start(job_id: str, attempt: int = 1, **spec) -> StartJob:
    return StartJob(job_id=job_id, attempt=attempt, backend=NoopSpec(**spec))


@pytest.fixture
def supervisor(tmp_path):
    sup = BackendSupervisor(NoopBackend(), max_jobs=2, work_dir=tmp_path)
    return sup, RecordingConnector(sup)


async def test_reports_in_order(supervisor):
    sup, rec = supervisor
    await sup.start_job(start("a", output="hi\n", exit_code=3))
    assert await rec.wait_ended("a") == "failed"
    assert rec.phases("a") == ["initializing", "running", "failed"]
    kinds = [type(e).__name__ for e in rec.events]
    # Output before the exit status, the exit status before the terminal phase.
    assert kinds.index("Output") < kinds.index("JobExit") < len(kinds) - 1
    exit_event = next(e for e in rec.events if isinstance(e, JobExit))
    assert exit_event.exit_code == 3
    assert rec.output("a") == b"hi\n"
    assert [e.seq for e in rec.events] == list(range(1, len(rec.events) + 1))


async def test_repeated_start_is_acknowledged_not_rerun(supervisor):
    sup, rec = supervisor
    await sup.start_job(start("a", delay_s=0.2))
    await sup.start_job(start("a", delay_s=0.2))  # a repeat while running: no error
    assert await rec.wait_ended("a") == "succeeded"
    assert rec.phases("a").count("running") == 1
    with pytest.raises(JobError) as again:  # a repeat after it ended: refused, not rerun
        await sup.start_job(start("a"))
    assert again.value.kind is JobErrorKind.JOB_ALREADY_EXISTS


async def test_other_attempt_of_a_running_job_is_refused(supervisor):
    sup, _ = supervisor
    await sup.start_job(start("a", delay_s=5))
    with pytest.raises(JobError) as refused:
        await sup.start_job(start("a", attempt=2))
    assert refused.value.kind is JobErrorKind.ALREADY_RUNNING
    await sup.stop_job(StopJob(job_id="a", attempt=1))


async def test_max_concurrent_jobs(supervisor):
    sup, _ = supervisor
    await sup.start_job(start("a", delay_s=5))
    await sup.start_job(start("b", delay_s=5))
    with pytest.raises(JobError) as refused:
        await sup.start_job(start("c"))
    assert refused.value.kind is JobErrorKind.MAX_CONCURRENT_JOBS
    assert {r.job_id for r in sup.held_runs()} == {"a", "b"}
    await sup.shutdown(grace_s=1)


async def test_wrong_backend_kind_is_not_compatible(supervisor):
    sup, _ = supervisor
    with pytest.raises(JobError) as refused:
        await sup.start_job(
            StartJob(job_id="w", attempt=1, backend=WasmSpec(module="sha256:" + "0" * 64))
        )
    assert refused.value.kind is JobErrorKind.IMAGE_NOT_COMPATIBLE


async def test_stop_cancels_and_repeats_are_harmless(supervisor):
    sup, rec = supervisor
    await sup.start_job(start("a", delay_s=30))
    await asyncio.sleep(0.05)
    stop = StopJob(job_id="a", attempt=1, reason="canceled")
    await sup.stop_job(stop)
    await sup.stop_job(stop)
    await sup.stop_job(StopJob(job_id="unknown", attempt=1))
    assert await rec.wait_ended("a", limit_s=5) == "canceled"
    assert rec.phases("a") == ["initializing", "running", "terminating", "canceled"]


async def test_run_timeout_ends_timed_out(supervisor):
    sup, rec = supervisor
    await sup.start_job(
        StartJob(job_id="t", attempt=1, backend=NoopSpec(delay_s=30), timeout_s=0.1)
    )
    assert await rec.wait_ended("t", limit_s=5) == "timed_out"


async def test_backend_failure_is_an_internal_error(tmp_path):
    class Broken(NoopBackend):
        async def run(self, ctx):
            raise RuntimeError("boom")

    sup = BackendSupervisor(Broken(), work_dir=tmp_path)
    rec = RecordingConnector(sup)
    await sup.start_job(start("x"))
    assert await rec.wait_ended("x") == "failed"
    error = next(e for e in rec.events if isinstance(e, JobErrorReport))
    assert error.kind is JobErrorKind.INTERNAL_ERROR and "boom" in error.description


async def test_image_errors_reject_the_run(tmp_path):
    class Missing(NoopBackend):
        async def run(self, ctx):
            raise JobError(JobErrorKind.IMAGE_NOT_FOUND, "no such module")

    sup = BackendSupervisor(Missing(), work_dir=tmp_path)
    rec = RecordingConnector(sup)
    await sup.start_job(start("x"))
    assert await rec.wait_ended("x") == "rejected"
    states = [e for e in rec.events if isinstance(e, JobStateChanged)]
    assert states[-1].message and "no such module" in states[-1].message
