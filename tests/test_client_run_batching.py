"""run()'s natural batching against a real switchboard and a noop supervisor: many threads
(or tasks) sharing one client each get their own job's result, through far fewer
requests than jobs; a bad spec among them fails only its caller; each caller's timeout
holds while the others' jobs go on; a coalesced job can be canceled; joined waits outlive
a switchboard killed under them. (The pure part:
tests/test_client_batching.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.spec import JobSpec, NoopBackend, Selector
from protocol.state import Phase
from switchboard.client import AsyncClient, BadRequest, Client, JobFailed, WaitTimeout
from tests.harness import Process, Switchboard, scaled, start_supervisor, wait_connected, wait_for

pytestmark = pytest.mark.process

SUPERVISOR = "batching-noop"


@pytest.fixture(scope="module")
def supervisor(switchboard: Switchboard, work_dir: Path) -> Iterator[Process]:
    process = start_supervisor(switchboard, work_dir, name=SUPERVISOR, backend="noop", max_jobs=64)
    wait_connected(switchboard.client(), SUPERVISOR)
    yield process
    process.stop()


@pytest.fixture
def client(switchboard: Switchboard, supervisor: Process) -> Iterator[Client]:
    with Client(switchboard.url, switchboard.admin_token) as api:
        yield api


def noop(name: str, **backend: Any) -> JobSpec:
    return JobSpec(name=name, backend=NoopBackend(**backend))


def counted(http: httpx.Client | httpx.AsyncClient) -> list[str]:
    """The requests the client sends from now on, as `METHOD path`."""
    sent: list[str] = []

    def hook(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    async def async_hook(request: httpx.Request) -> None:
        hook(request)

    http.event_hooks["request"] = [async_hook if isinstance(http, httpx.AsyncClient) else hook]
    return sent


def in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run each call in a thread of its own, all let go at once: each one's result, or
    the exception it raised."""
    out: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        try:
            out[index] = calls[index]()
        except Exception as exc:  # the test looks at it
            out[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(scaled(120))
    assert not any(thread.is_alive() for thread in threads)
    return out


def anchored(client: Client) -> threading.Thread:
    """A run in flight for a few seconds, so the calls made meanwhile join others."""
    thread = threading.Thread(
        target=lambda: client.run(noop("anchor", delay_s=4), timeout=60), daemon=True
    )
    thread.start()
    time.sleep(0.3)
    return thread


def test_many_threads_share_requests_and_each_gets_its_own_job(client):
    sent = counted(client._http)
    threads, rounds = 32, 4

    def loop(thread: int) -> list[str]:
        names = []
        for round_ in range(rounds):
            name = f"t{thread}-{round_}"
            job = client.run(noop(name, delay_s=0.2, exit_code=0), params={"N": name})
            assert job.phase is Phase.SUCCEEDED and job.name == name
            assert job.spec.parameters["N"].value == name and job.runs
            names.append(name)
        return names

    results = in_threads([lambda i=i: loop(i) for i in range(threads)])
    for thread, result in enumerate(results):
        assert result == [f"t{thread}-{r}" for r in range(rounds)], result
    jobs = threads * rounds
    # Alone, each job is one request at least (POST ?wait=); together they share: about
    # 0.4 requests a job on an idle machine, more when a loaded one spreads the calls out.
    assert len(sent) < jobs * 0.8, sent
    assert any(line == "POST /api/v1/jobs/batch" for line in sent)
    assert any(line == "GET /api/v1/jobs/ended" for line in sent)


def test_one_call_alone_is_one_request(client):
    sent = counted(client._http)
    assert client.run(noop("alone"), timeout=60).phase is Phase.SUCCEEDED
    assert sent == ["POST /api/v1/jobs"]


def test_a_failed_job_raises_its_own_exit_code(client):
    anchor = anchored(client)
    codes = [0, 3, 0, 5, 0]
    out = in_threads(
        [lambda c=c: client.run(noop(f"code{c}", exit_code=c), timeout=60) for c in codes]
    )
    for code, result in zip(codes, out, strict=True):
        if code == 0:
            assert result.phase is Phase.SUCCEEDED, result
        else:
            assert isinstance(result, JobFailed) and result.exit_code == code, result
    anchor.join(scaled(60))


def test_a_bad_spec_among_good_ones_fails_only_its_caller(client):
    anchor = anchored(client)
    sent = counted(client._http)
    bad = {"name": "bad", "backend": {"kind": "noop", "delay_s": -1}}
    specs: list[Any] = [noop(f"good{i}") for i in range(6)]
    specs.insert(3, bad)
    out = in_threads([lambda s=s: client.run(s, timeout=60) for s in specs])
    for spec, result in zip(specs, out, strict=True):
        if spec is bad:
            assert isinstance(result, BadRequest), result
            assert result.field is not None and not result.field.startswith("[")
        else:
            assert result.phase is Phase.SUCCEEDED, result
    assert "POST /api/v1/jobs/batch" in sent
    anchor.join(scaled(60))


def test_a_callers_timeout_holds_while_the_others_jobs_go_on(client):
    anchor = anchored(client)
    started = time.monotonic()
    out = in_threads(
        [
            lambda: client.run(noop("long", delay_s=30), timeout=1),
            lambda: client.run(noop("short", delay_s=2), timeout=60),
        ]
    )
    timed_out, short = out
    assert isinstance(timed_out, WaitTimeout), timed_out
    assert timed_out.job is not None and timed_out.job.phase is not Phase.SUCCEEDED
    assert short.phase is Phase.SUCCEEDED
    assert time.monotonic() - started < scaled(30)
    # The long job goes on: the timeout was the caller's, not the job's.
    assert client.get_job(timed_out.job_id).phase in (
        Phase.ASSIGNED,
        Phase.RUNNING,
        Phase.INITIALIZING,
    )
    client.cancel(timed_out.job_id)
    anchor.join(scaled(60))


def test_a_coalesced_job_can_be_canceled(client):
    anchor = anchored(client)
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(client.run(noop("to-cancel", delay_s=60), timeout=60))
        except Exception as exc:  # the test looks at it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def running() -> str | None:
        page = client.get("/api/v1/jobs", q="to-cancel", phase=["running"])
        return page["items"][0]["id"] if page["items"] else None

    job_id = wait_for(running, "the job to run")
    client.cancel(job_id)
    thread.join(scaled(30))
    (failed,) = out
    assert isinstance(failed, JobFailed) and failed.phase is Phase.CANCELED
    assert failed.job.id == job_id
    anchor.join(scaled(60))


def test_async_runs_gathered_share_requests(switchboard, supervisor):
    async def main() -> None:
        async with AsyncClient(switchboard.url, switchboard.admin_token) as client:
            sent = counted(client._http)
            names = [f"a{i}" for i in range(40)]
            jobs = await asyncio.gather(
                *(client.run(noop(name, delay_s=0.2), timeout=60) for name in names)
            )
            assert [job.name for job in jobs] == names
            assert all(job.phase is Phase.SUCCEEDED for job in jobs)
            assert len(sent) < len(names) / 2, sent
            # A bad spec among them fails only its caller; a short timeout only its own.
            bad = {"name": "bad", "backend": {"kind": "noop", "delay_s": -1}}
            out = await asyncio.gather(
                client.run(noop("slow", delay_s=2), timeout=60),
                client.run(noop("x"), timeout=60),
                client.run(bad, timeout=60),
                client.run(noop("long", delay_s=30), timeout=1),
                client.run(noop("y", exit_code=4), timeout=60),
                return_exceptions=True,
            )
            slow, x, refused, timed_out, failed = out
            assert slow.phase is Phase.SUCCEEDED and x.phase is Phase.SUCCEEDED
            assert isinstance(refused, BadRequest), refused
            assert isinstance(timed_out, WaitTimeout), timed_out
            assert isinstance(failed, JobFailed) and failed.exit_code == 4
            await client.cancel(timed_out.job_id)

    asyncio.run(main())


def test_joined_waits_outlive_a_switchboard_killed_under_them(tmp_path):
    """The switchboard is killed while joined calls wait: each asks again until it is back
    (within its own timeout) and gets its own job; none hangs."""
    server = Switchboard(tmp_path / "data")
    nowhere = Selector(match_labels={"placement": "nowhere"})
    try:
        with Client(server.url, server.admin_token) as api:

            def queued(name: str) -> Callable[[], Any]:
                spec = JobSpec(
                    name=name, backend=NoopBackend(), selector=nowhere, queue_timeout_s=3
                )
                return lambda: api.run(spec, timeout=60, check=False)

            # The anchor goes alone (its POST ?wait= is not asked again once sent); the
            # others join it.
            anchor: list[Any] = []
            first = threading.Thread(target=lambda: _catch(anchor, queued("anchor")))
            first.start()
            time.sleep(0.3)
            started = time.monotonic()
            results: list[Any] = []
            joined = threading.Thread(
                target=lambda: results.extend(in_threads([queued(f"j{i}") for i in range(5)]))
            )
            joined.start()
            time.sleep(1)  # their batch is stored; they wait
            server.kill_and_restart()
            joined.join(scaled(60))
            first.join(scaled(60))
            assert [r.name for r in results] == [f"j{i}" for i in range(5)], results
            assert all(r.phase is Phase.TIMED_OUT for r in results)  # their queue timeout
            assert time.monotonic() - started < scaled(30)
            assert anchor, "the anchor's call did not end"
    finally:
        server.stop()


def _catch(out: list[Any], call: Callable[[], Any]) -> None:
    try:
        out.append(call())
    except Exception as exc:  # the test looks at it
        out.append(exc)
