"""The Python client library (switchboard.client) against a real switchboard and a noop
supervisor: submit and wait, submit-and-wait in one request, many jobs as they complete,
output, artifacts, typed errors, retries on 429, and a wait that outlives a switchboard
killed and restarted under it. `switchboard job wait` is the CLI's use of it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.spec import JobSpec, NoopBackend, Parameter, Selector
from protocol.state import Phase
from switchboard.client import (
    AsyncClient,
    BadRequest,
    Client,
    JobFailed,
    NotFound,
    Retry,
    Unauthorized,
    WaitTimeout,
)
from tests.harness import REPO, Process, Switchboard, scaled, start_supervisor, wait_connected

pytestmark = pytest.mark.process

SUPERVISOR = "client-noop"
NOWHERE = {"match_labels": {"placement": "nowhere"}}


@pytest.fixture(scope="module")
def supervisor(switchboard: Switchboard, work_dir: Path) -> Iterator[Process]:
    process = start_supervisor(switchboard, work_dir, name=SUPERVISOR, backend="noop", max_jobs=8)
    wait_connected(switchboard.client(), SUPERVISOR)
    yield process
    process.stop()


@pytest.fixture
def client(switchboard: Switchboard, supervisor: Process) -> Iterator[Client]:
    with Client(switchboard.url, switchboard.admin_token) as api:
        yield api


def noop(name: str = "client", **backend: Any) -> JobSpec:
    return JobSpec(name=name, backend=NoopBackend(**backend))


def test_submit_then_wait(client):
    job = client.submit(noop(delay_s=0.2, output="hello\n"), params={"WHO": "me"})
    assert job.created is not None and job.created.phase == "queued"
    done = job.wait(timeout=60)
    assert done.phase is Phase.SUCCEEDED
    assert done.exit_code == 0
    assert done.spec.parameters == {"WHO": Parameter(value="me")}
    assert [run.phase for run in done.runs] == [Phase.SUCCEEDED]
    assert job.output() == b"hello\n"
    assert b"".join(job.follow()) == b"hello\n"  # an ended run: its bytes, then the end


def test_a_failed_job_raises_with_its_exit_code(client):
    job = client.submit({"name": "fails", "backend": {"kind": "noop", "exit_code": 3}})
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=60)
    assert failed.value.exit_code == 3
    assert failed.value.phase is Phase.FAILED
    assert f"job {job.id} ended failed (exit code 3)" in str(failed.value)
    assert job.wait(timeout=60, check=False).exit_code == 3


def test_run_submits_and_waits_in_one_call(client):
    done = client.run(noop(output="one\n"), timeout=60)
    assert done.phase is Phase.SUCCEEDED
    assert client.output(done.id) == b"one\n"
    with pytest.raises(JobFailed):
        client.run(noop(exit_code=1), timeout=60)


def test_wait_timeout_says_how_the_job_was_last_seen(client):
    job = client.submit(JobSpec(name="stuck", backend=NoopBackend(), selector=Selector(**NOWHERE)))
    try:
        start = time.monotonic()
        with pytest.raises(WaitTimeout) as timed_out:
            job.wait(timeout=0.5)
        assert time.monotonic() - start >= 0.5
        assert timed_out.value.job is not None
        assert timed_out.value.job.phase is Phase.QUEUED
        assert isinstance(timed_out.value, TimeoutError)
    finally:
        job.cancel()
    assert job.wait(timeout=30, check=False).phase is Phase.CANCELED


def test_as_completed_yields_jobs_as_they_end(client):
    delays = [1.5, 0.1, 0.8]
    jobs = client.submit_many([noop(f"many-{d}", delay_s=d) for d in delays])
    assert [job.created.phase for job in jobs if job.created] == ["queued"] * 3
    ended = list(client.as_completed(jobs, timeout=60))
    assert {job.id for job in ended} == {job.id for job in jobs}
    assert ended[-1].id == jobs[0].id  # the slowest comes last
    assert all(job.summary and job.summary.phase is Phase.SUCCEEDED for job in ended)


def test_errors_are_typed(client, switchboard):
    with pytest.raises(NotFound):
        client.job("000000000000000000000000").refresh()
    with pytest.raises(BadRequest) as bad:
        client.submit({"name": "bad", "backend": {"kind": "noop", "delay_s": -1}})
    assert bad.value.field == "backend.delay_s"
    with Client(switchboard.url, "sbt_not-a-token") as stranger, pytest.raises(Unauthorized):
        stranger.submit(noop())


def test_upload_an_artifact(client, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.upload(data).digest == digest
    path = tmp_path / "blob"
    path.write_bytes(data[::-1])
    stored = client.upload(path)  # sent in pieces as it is read
    assert stored.size == len(data)
    assert stored.digest == "sha256:" + hashlib.sha256(data[::-1]).hexdigest()


def test_async_client(switchboard, supervisor):
    async def main() -> tuple[list[str], Phase]:
        async with AsyncClient(switchboard.url, switchboard.admin_token) as api:
            jobs = await api.submit_many([noop(f"async-{i}", delay_s=0.05 * i) for i in range(20)])
            ended = [job.id async for job in api.as_completed(jobs, timeout=60)]
            assert sorted(ended) == sorted(job.id for job in jobs)
            one = await api.run(noop(output="async\n"), timeout=60)
            assert await api.output(one.id) == b"async\n"
            waits = await asyncio.gather(*(job.wait(timeout=60) for job in jobs))
            return ended, waits[0].phase

    ended, phase = asyncio.run(main())
    assert len(ended) == 20
    assert phase is Phase.SUCCEEDED


def test_job_wait_command_exits_with_the_jobs_code(client, switchboard):
    env = dict(
        os.environ,
        SWITCHBOARD_URL=switchboard.url,
        SWITCHBOARD_TOKEN=switchboard.admin_token,
        PYTHONPATH=str(REPO),
    )
    job = client.submit(noop(delay_s=0.3, exit_code=4))
    done = subprocess.run(
        [sys.executable, "-m", "switchboard", "job", "wait", job.id],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert f"job {job.id} ended failed (exit code 4)".encode() in done.stderr
    stuck = client.submit(
        JobSpec(name="stuck", backend=NoopBackend(), selector=Selector(**NOWHERE))
    )
    try:
        late = subprocess.run(
            [sys.executable, "-m", "switchboard", "job", "wait", stuck.id, "--timeout", "0.3"],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert late.returncode == 3, late.stderr
        assert b"had not ended after 0.3s, last seen queued" in late.stderr
    finally:
        stuck.cancel()


def test_submit_retries_while_the_queue_is_full_and_waits_fit_a_short_max_wait(tmp_path):
    server = Switchboard(tmp_path / "data", extra_args=("--max-queued", "1", "--max-wait", "1"))
    try:
        with Client(server.url, server.admin_token, retry=Retry(attempts=100, max_s=0.1)) as api:
            first = api.submit(
                JobSpec(name="a", backend=NoopBackend(), selector=Selector(**NOWHERE))
            )
            out: list[Any] = []
            thread = threading.Thread(target=lambda: out.append(api.submit(noop("b"))))
            thread.start()
            time.sleep(0.5)  # refused with 429 a few times by now
            assert not out
            first.cancel()
            thread.join(scaled(30))
            assert out and out[0].created.phase == "queued"
            out[0].cancel()
            # Waits over a second are refused here (400): the client asks for shorter ones.
            stuck = JobSpec(name="c", backend=NoopBackend(), selector=Selector(**NOWHERE))
            with pytest.raises(WaitTimeout) as timed_out:  # not BadRequest
                api.run(stuck, timeout=1.5)
            assert timed_out.value.job is not None
            assert timed_out.value.job.phase is Phase.QUEUED
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_wait_outlives_a_switchboard_restart(tmp_path, how):
    """The switchboard goes away (SIGKILL, or stopped) while the client waits: the client
    asks again until it is back, and gets the job when it ends."""
    server = Switchboard(tmp_path / "data")
    try:
        with Client(server.url, server.admin_token) as api:
            spec = JobSpec(
                name="outlives",
                backend=NoopBackend(),
                selector=Selector(**NOWHERE),
                queue_timeout_s=3,
            )
            job = api.submit(spec)
            out: list[Any] = []
            start = time.monotonic()
            thread = threading.Thread(
                target=lambda: out.append(job.wait(timeout=60, check=False)), daemon=True
            )
            thread.start()
            time.sleep(0.3)
            if how == "kill":
                server.kill_and_restart()
            else:
                server.restart()
            thread.join(scaled(60))
            assert out, "the wait did not end"
            assert out[0].phase is Phase.TIMED_OUT  # its queue timeout, after the restart
            assert time.monotonic() - start < 30
    finally:
        server.stop()
