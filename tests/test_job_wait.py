"""Waiting for jobs without polling (`?wait=` on the jobs API): a wait answers as soon as
the job ends, or with its current state when the wait is over; cancel, deletion and a
stopping switchboard answer waiters at once; a thousand waiters cost the switchboard next
to nothing while they wait. Real switchboard processes and a noop supervisor."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    Process,
    Switchboard,
    scaled,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_running,
)
from tests.scrape import sample_value, sample_value_or_zero, scrape

pytestmark = pytest.mark.process

SUPERVISOR = "wait-noop"
#: A selector no supervisor of this module satisfies: such jobs stay queued.
NOWHERE = {"match_labels": {"placement": "nowhere"}}
TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "lost", "exhausted", "rejected"}


@pytest.fixture(scope="module")
def supervisor(switchboard: Switchboard, work_dir: Path) -> Iterator[Process]:
    process = start_supervisor(switchboard, work_dir, name=SUPERVISOR, backend="noop", max_jobs=8)
    wait_connected(switchboard.client(), SUPERVISOR)
    yield process
    process.stop()


@pytest.fixture
def client(switchboard: Switchboard, supervisor: Process) -> Iterator[httpx.Client]:
    with switchboard.client() as api:
        yield api


def spec(name: str = "wait", **fields: Any) -> dict[str, Any]:
    backend = {"kind": "noop", **fields.pop("backend", {})}
    return {"name": name, "backend": backend, **fields}


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def waited(client: httpx.Client, path: str, **params: Any) -> tuple[httpx.Response, float]:
    """The answer to a GET, and the seconds it took."""
    start = time.monotonic()
    response = client.get(path, params=params, timeout=90)
    return response, time.monotonic() - start


def in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    """Run `call` in a thread; its result lands in the list."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def test_wait_answers_when_the_job_ends(client):
    job_id = submit(client, spec(backend={"delay_s": 0.5, "exit_code": 3}))
    response, took = waited(client, f"/api/v1/jobs/{job_id}", wait=60)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["phase"] == "failed"
    assert job["exit_code"] == 3
    assert job["runs"][-1]["exit_code"] == 3
    assert took < 30  # ended long before its wait: answered at the ending, not the deadline
    # An ended job answers at once however long the wait.
    again, _ = waited(client, f"/api/v1/jobs/{job_id}", wait=60)
    assert again.json()["phase"] == "failed"


def test_wait_over_answers_with_the_current_state(client):
    job_id = submit(client, spec(selector=NOWHERE))
    try:
        response, took = waited(client, f"/api/v1/jobs/{job_id}", wait=0.5)
        assert response.status_code == 200, response.text
        assert response.json()["phase"] == "queued"
        assert took >= 0.5
        # wait=0 is a plain read.
        assert waited(client, f"/api/v1/jobs/{job_id}", wait=0)[0].json()["phase"] == "queued"
    finally:
        client.post(f"/api/v1/jobs/{job_id}/cancel")


def test_cancel_answers_a_waiter(client):
    job_id = submit(client, spec(backend={"delay_s": 120}))
    wait_running(client, job_id)
    thread, out = in_thread(lambda: waited(client, f"/api/v1/jobs/{job_id}", wait=60))
    wait_for(lambda: _waiters(client) >= 1, "the request to wait")
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    thread.join(scaled(30))
    response, took = out[0]
    assert response.json()["phase"] == "canceled"
    assert took < 30


def test_a_queued_job_canceled_answers_a_waiter_and_a_deleted_one_is_not_listed(client):
    queued = submit(client, spec(selector=NOWHERE))
    thread, out = in_thread(lambda: waited(client, f"/api/v1/jobs/{queued}", wait=60))
    wait_for(lambda: _waiters(client) >= 1, "the request to wait")
    client.post(f"/api/v1/jobs/{queued}/cancel")
    thread.join(scaled(30))
    assert out[0][0].json()["phase"] == "canceled"
    other = submit(client, spec(selector=NOWHERE))
    try:
        wait = {"ids": f"{queued},{other}", "wait": 30}
        listed, _ = waited(client, "/api/v1/jobs", **wait)  # the canceled one: at once
        assert [item["id"] for item in listed.json()["items"]] == [queued]
        assert client.delete(f"/api/v1/jobs/{queued}").status_code == 204
        wait["wait"] = 0.5
        response, took = waited(client, "/api/v1/jobs", **wait)
        assert response.json()["items"] == []
        assert took >= 0.5
        assert client.get(f"/api/v1/jobs/{queued}", params={"wait": 5}).status_code == 404
    finally:
        client.post(f"/api/v1/jobs/{other}/cancel")


def test_submit_and_wait_in_one_request(client):
    response = client.post(
        "/api/v1/jobs", params={"wait": 60}, json=spec(backend={"output": "hi\n"}), timeout=90
    )
    assert response.status_code == 201, response.text
    made = response.json()
    assert made["phase"] == "queued"  # when it was stored
    job = made["job"]
    assert job["id"] == made["id"]
    assert job["phase"] == "succeeded"
    assert job["exit_code"] == 0
    assert job["runs"][0]["output_bytes"] == 3
    # Without `wait`, no job in the answer.
    plain = client.post("/api/v1/jobs", json=spec())
    assert "job" not in plain.json() or plain.json()["job"] is None


def test_wait_for_many_lists_those_that_ended(client):
    quick = submit(client, spec(backend={"delay_s": 0.3}))
    slow = [submit(client, spec(backend={"delay_s": 120})) for _ in range(2)]
    try:
        response, took = waited(client, "/api/v1/jobs", ids=",".join([*slow, quick]), wait=60)
        assert response.status_code == 200, response.text
        page = response.json()
        assert [item["id"] for item in page["items"]] == [quick]
        assert page["items"][0]["phase"] == "succeeded"
        assert page["next_cursor"] is None
        assert took < 30
        # Without wait, `ids` lists them all, whatever their phase (repeated works too).
        listed = client.get("/api/v1/jobs", params=[("ids", slow[0]), ("ids", quick)])
        assert {item["id"] for item in listed.json()["items"]} == {slow[0], quick}
    finally:
        for job_id in slow:
            client.post(f"/api/v1/jobs/{job_id}/cancel")


def test_ended_answers_full_views_of_those_that_ended(client):
    quick = submit(client, spec(backend={"delay_s": 0.3, "exit_code": 4}))
    slow = submit(client, spec(backend={"delay_s": 120}))
    try:
        response, took = waited(client, "/api/v1/jobs/ended", ids=f"{slow},{quick}", wait=60)
        assert response.status_code == 200, response.text
        (job,) = response.json()
        assert took < 30
        # The whole job, as GET /api/v1/jobs/{id} shows it.
        assert job == client.get(f"/api/v1/jobs/{quick}").json()
        assert job["phase"] == "failed" and job["exit_code"] == 4
        assert job["runs"][0]["exit_code"] == 4
        # None ended yet: the wait is over with an empty list; without wait, at once.
        response, took = waited(client, "/api/v1/jobs/ended", ids=slow, wait=0.5)
        assert response.json() == [] and took >= 0.5
        assert client.get("/api/v1/jobs/ended", params={"ids": slow}).json() == []
        # A cancel answers at once.
        thread, out = in_thread(
            lambda: client.get("/api/v1/jobs/ended", params={"ids": slow, "wait": 60})
        )
        wait_for(lambda: _waiters(client) >= 1, "the request to wait")
        client.post(f"/api/v1/jobs/{slow}/cancel")
        thread.join(scaled(10))
        assert [job["phase"] for job in out[0].json()] == ["canceled"]
    finally:
        client.post(f"/api/v1/jobs/{slow}/cancel")


def test_ended_refuses_bad_waits_and_names_unknown_jobs(client, switchboard):
    url = f"{switchboard.url}/metrics"
    before = scrape(url)
    job_id = submit(client, spec())
    path = "/api/v1/jobs/ended"
    too_long = client.get(path, params={"ids": job_id, "wait": 61})
    assert too_long.status_code == 400
    assert too_long.json()["field"] == "wait"
    no_ids = client.get(path, params={"wait": 1})
    assert no_ids.status_code == 400
    assert no_ids.json() == {
        "error": "invalid_request",
        "message": "ids: a wait is only for the jobs `ids` names",
        "field": "ids",
    }
    assert client.get(path).status_code == 400
    many = ",".join(f"{i:024x}" for i in range(501))
    assert client.get(path, params={"ids": many}).status_code == 400
    unknown = "000000000000000000000000"
    missing = client.get(path, params={"ids": f"{job_id},{unknown}", "wait": 5})
    assert missing.status_code == 404
    assert missing.json() == {
        "error": "not_found",
        "message": f"ids: no job {unknown!r}",
        "field": "ids",
    }
    after = scrape(url)

    def grew(reason: str) -> float:
        name = "switchboard_wait_refusals_total"
        return sample_value(after, name, reason=reason) - sample_value_or_zero(
            before, name, reason=reason
        )

    assert grew("wait_too_long") == 1
    assert grew("no_ids") == 2
    assert grew("too_many_ids") == 1
    assert grew("unknown_ids") == 1


def test_ended_answers_404_for_a_deleted_job(client):
    job_id = submit(client, spec(backend={"delay_s": 120}))
    other = submit(client, spec(backend={"delay_s": 120}))
    try:
        client.post(f"/api/v1/jobs/{other}/cancel")
        waited(client, f"/api/v1/jobs/{other}", wait=30)  # (a running one ends once stopped)
        assert client.delete(f"/api/v1/jobs/{other}").status_code == 204
        gone = client.get("/api/v1/jobs/ended", params={"ids": f"{job_id},{other}", "wait": 5})
        assert gone.status_code == 404 and other in gone.json()["message"]
    finally:
        client.post(f"/api/v1/jobs/{job_id}/cancel")


def test_bad_waits_are_refused(client, switchboard):
    url = f"{switchboard.url}/metrics"
    before = scrape(url)
    job_id = submit(client, spec())
    too_long = client.get(f"/api/v1/jobs/{job_id}", params={"wait": 61})
    assert too_long.status_code == 400
    assert too_long.json() == {
        "error": "invalid_request",
        "message": "wait: at most 60 seconds, not 61",
        "field": "wait",
    }
    assert client.post("/api/v1/jobs", params={"wait": 1e9}, json=spec()).status_code == 400
    assert client.get(f"/api/v1/jobs/{job_id}", params={"wait": -1}).status_code == 400
    no_ids = client.get("/api/v1/jobs", params={"wait": 1})
    assert no_ids.status_code == 400
    assert no_ids.json()["field"] == "ids"
    many = ",".join(f"{i:024x}" for i in range(501))
    assert client.get("/api/v1/jobs", params={"ids": many}).status_code == 400
    missing = client.get("/api/v1/jobs/000000000000000000000000", params={"wait": 5})
    assert missing.status_code == 404
    after = scrape(url)

    def grew(reason: str) -> float:
        name = "switchboard_wait_refusals_total"
        return sample_value(after, name, reason=reason) - sample_value_or_zero(
            before, name, reason=reason
        )

    assert grew("wait_too_long") == 2
    assert grew("no_ids") == 1
    assert grew("too_many_ids") == 1


def _waiters(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sample_value(text, "switchboard_job_waiters")


def test_a_stopping_switchboard_answers_its_waiters(tmp_path):
    server = Switchboard(tmp_path / "data")
    try:
        with server.client() as client:
            job_id = submit(client, spec(selector=NOWHERE))
            thread, out = in_thread(lambda: waited(client, f"/api/v1/jobs/{job_id}", wait=60))
            wait_for(lambda: _waiters(client) >= 1, "the request to wait")
            start = time.monotonic()
            server.restart()
            thread.join(scaled(30))
            response, _ = out[0]
            # Answered with the state it had, not cut, and well before the wait was over.
            assert response.status_code == 200
            assert response.json()["phase"] == "queued"
            assert time.monotonic() - start < 30
        with server.client() as client:  # the job survived the restart, still waitable
            response, _ = waited(client, f"/api/v1/jobs/{job_id}", wait=0.2)
            assert response.json()["phase"] == "queued"
    finally:
        server.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_thousand_waiters_are_cheap(tmp_path):
    """1000 requests wait on 1000 queued jobs: while they wait the switchboard does next to
    nothing; as the jobs end (canceled one by one) every waiter is answered."""
    count = 1000
    server = Switchboard(tmp_path / "data", extra_args=("--max-connections", str(count + 100)))
    try:
        with server.client() as client:
            body = [spec(f"many-{i}", selector=NOWHERE) for i in range(count)]
            made = client.post("/api/v1/jobs/batch", json=body, timeout=60)
            assert made.status_code == 201, made.text
            ids = [job["id"] for job in made.json()["jobs"]]

            async def wait_all() -> list[dict[str, Any]]:
                limits = httpx.Limits(max_connections=count)
                headers = {"Authorization": f"Bearer {server.admin_token}"}
                async with httpx.AsyncClient(
                    base_url=server.url, headers=headers, limits=limits, timeout=90
                ) as http:
                    answers = await asyncio.gather(
                        *(http.get(f"/api/v1/jobs/{i}", params={"wait": 60}) for i in ids)
                    )
                return [answer.json() for answer in answers]

            thread, out = in_thread(lambda: asyncio.run(wait_all()))
            wait_for(lambda: _waiters(client) >= count, f"{count} waiters", timeout=60)
            # Idle with a thousand waiters: CPU over a second of wall time.
            pid = server.process.proc.pid
            cpu, wall = _cpu_seconds(pid), time.monotonic()
            time.sleep(1.0)
            cpu, wall = _cpu_seconds(pid) - cpu, time.monotonic() - wall
            print(f"\n{count} waiters: switchboard CPU {cpu:.3f}s over {wall:.2f}s")
            assert cpu < 0.25 * wall
            # (From another client: one pool holding a thousand waiting requests is slow to
            # take more, on the client's side.)
            for job_id in ids:
                assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
            thread.join(scaled(60))
            jobs = out[0]
            assert len(jobs) == count
            assert {job["phase"] for job in jobs} == {"canceled"}
            assert _waiters(client) == 0
    finally:
        server.stop()
