"""Jobs placed at submission: when nothing else waits and the slots the last placement left
free fit them, new jobs get their run in the transaction that stores them. They must be
placed exactly as a dispatch pass would have placed them: never ahead of an older job,
never beyond a supervisor's slots, never a second job of a busy concurrency key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from protocol.spec import Concurrency, JobSpec, NoopBackend
from protocol.state import Phase
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job
from tests.scrape import sample_value, scrape
from tests.store_setup import HELLO, SPEC

# --- the store's half: one transaction, and only when the queue is clear ---------------


@pytest.mark.unit
async def test_a_job_is_stored_and_assigned_in_one_step(store):
    await store.supervisor_connected(HELLO)
    made, runs = await store.create_and_assign([("new", SPEC)], "tester", 100, {"new": "s1"})
    assert [m.phase for m in made] == ["queued"]
    assert [(r.job_id, r.attempt, r.supervisor_id) for r in runs] == [("new", 1, "s1")]
    job = await store.get_job("new")
    assert job.phase == Phase.ASSIGNED and job.runs[0].supervisor_id == "s1"
    events = await store.job_events("new")
    assert [e.kind for e in events] == ["submitted", "run_phase"]
    assert events[1].message == "run 1: assigned"


@pytest.mark.unit
async def test_an_older_ready_job_keeps_its_turn(store):
    await store.supervisor_connected(HELLO)
    await store.create_job("older", SPEC)
    made, runs = await store.create_and_assign([("newer", SPEC)], "tester", 100, {"newer": "s1"})
    assert runs == [] and [m.phase for m in made] == ["queued"]
    assert (await store.get_job("newer")).phase == Phase.QUEUED
    assert (await store.get_job("older")).phase == Phase.QUEUED


@pytest.mark.unit
async def test_jobs_no_pass_would_place_do_not_count_as_waiting(store):
    await store.supervisor_connected(HELLO)
    await store.create_job("nobody-can", SPEC)
    await store.set_unschedulable({"nobody-can": "no supervisor matches"})
    _, runs = await store.create_and_assign([("new", SPEC)], "tester", 100, {"new": "s1"})
    assert [r.job_id for r in runs] == ["new"]


@pytest.mark.unit
async def test_a_job_its_concurrency_policy_rejects_gets_no_run(store):
    await store.supervisor_connected(HELLO)
    keyed = JobSpec(
        name="k",
        backend=NoopBackend(),
        concurrency=Concurrency(key="deploy", policy="drop_if_running"),
    )
    await store.create_and_assign([("first", keyed)], "tester", 100, {"first": "s1"})
    made, runs = await store.create_and_assign([("second", keyed)], "tester", 100, {"second": "s1"})
    assert [m.phase for m in made] == ["rejected"] and runs == []
    assert (await store.get_job("second")).runs == []


# --- the dispatcher's half, end to end -------------------------------------------------


@pytest.fixture(scope="module")
def client(switchboard: Switchboard, work_dir: Path) -> Iterator[httpx.Client]:
    supervisor = start_supervisor(
        switchboard, work_dir, name="two-slots", backend="noop", max_jobs=2
    )
    with switchboard.client() as api:
        wait_connected(api, "two-slots")
        # A first job: afterwards the dispatcher knows what is free.
        warm = api.post("/api/v1/jobs", json={"name": "warm", "backend": {"kind": "noop"}})
        assert wait_job(api, warm.json()["id"])["phase"] == "succeeded"
        yield api
    supervisor.stop()


def _noop(name: str, delay_s: float = 0.0, **fields: object) -> dict:
    return {"name": name, "backend": {"kind": "noop", "delay_s": delay_s}, **fields}


def _post(client: httpx.Client, *specs: dict) -> list[str]:
    response = client.post("/api/v1/jobs/batch", json=list(specs))
    assert response.status_code == 201, response.text
    return [job["id"] for job in response.json()["jobs"]]


def _ran(client: httpx.Client, job_id: str) -> dict:
    job = wait_job(client, job_id)
    assert job["phase"] == "succeeded", job
    return job


def test_a_job_submitted_to_an_idle_switchboard_is_placed_with_its_submission(switchboard, client):
    url = f"{switchboard.url}/metrics"
    before = scrape(url)
    for i in range(3):
        time.sleep(0.2)  # idle: the pass after the last job's end has run
        assert _ran(client, _post(client, _noop(f"lone{i}"))[0])["runs"][0]["attempt"] == 1
    after = scrape(url)
    placed = "switchboard_runs_placed_total"
    assert (
        sample_value(after, placed, via="submission")
        - sample_value(before, placed, via="submission")
        == 3
    )
    assert sample_value(after, placed, via="pass") == sample_value(before, placed, via="pass")


def test_more_jobs_than_free_slots_never_overfill_a_supervisor(client):
    # Single jobs, one more than the free slots, then a batch while those run.
    ids = [job_id for i in range(3) for job_id in _post(client, _noop(f"s{i}", delay_s=0.3))]
    ids += _post(client, *(_noop(f"b{i}", delay_s=0.3) for i in range(3)))
    jobs = [_ran(client, job_id) for job_id in ids]
    # A supervisor given more than its slots refuses the extra run as busy, which would
    # show as a second attempt: every job ran once.
    assert [len(job["runs"]) for job in jobs] == [1] * 6
    starts = sorted((job["runs"][0]["started_at"], job["runs"][0]["ended_at"]) for job in jobs)
    for i, (started, _) in enumerate(starts):
        overlapping = sum(1 for s, e in starts[:i] if e > started)
        assert overlapping <= 1, f"three runs at once on a two-slot supervisor: {starts}"


def test_a_busy_concurrency_key_holds_a_new_job(client):
    key = {"concurrency": {"key": "release", "policy": "queue"}}
    first, second = (
        _post(client, _noop("k1", delay_s=0.5, **key)),
        _post(client, _noop("k2", **key)),
    )
    first_job, second_job = _ran(client, first[0]), _ran(client, second[0])
    assert second_job["runs"][0]["started_at"] >= first_job["runs"][0]["ended_at"]


def test_priority_order_holds_for_jobs_that_wait(client):
    # Both slots taken: the next three wait, and run by priority, not by arrival.
    busy = _post(client, _noop("hold-1", delay_s=0.5), _noop("hold-2", delay_s=0.5))
    low, high = _post(client, _noop("low")), _post(client, _noop("high", priority=5))
    for job_id in busy:
        _ran(client, job_id)
    low_job, high_job = _ran(client, low[0]), _ran(client, high[0])
    assert high_job["runs"][0]["created_at"] <= low_job["runs"][0]["created_at"]
