"""End to end with real processes: switchboard server, supervisor, REST client."""

from __future__ import annotations

import time

import pytest

from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job, wait_running


@pytest.fixture(scope="module")
def noop_supervisor(switchboard: Switchboard, work_dir):
    process = start_supervisor(switchboard, work_dir, name="noop-1", backend="noop", max_jobs=8)
    wait_connected(switchboard.client(), "noop-1")
    yield process
    process.stop()


def submit(client, **backend) -> str:
    response = client.post(
        "/api/v1/jobs", json={"name": "e2e", "backend": {"kind": "noop", **backend}}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_job_runs_and_its_phases_are_recorded_in_order(switchboard, noop_supervisor):
    client = switchboard.client()
    job = wait_job(client, submit(client, output="hello\n"))
    assert job["phase"] == "succeeded" and job["exit_code"] == 0
    [run] = job["runs"]
    assert run["supervisor_id"] == "noop-1"
    assert [p["phase"] for p in run["phases"]] == [
        "assigned",
        "initializing",
        "running",
        "succeeded",
    ]
    stamps = [p["at"] for p in run["phases"]]
    assert stamps == sorted(stamps)
    assert client.get(f"/api/v1/jobs/{job['id']}/output").content == b"hello\n"


def test_nonzero_exit_fails_the_job(switchboard, noop_supervisor):
    client = switchboard.client()
    job = wait_job(client, submit(client, exit_code=42))
    assert job["phase"] == "failed" and job["exit_code"] == 42


def test_cancel_stops_a_running_job(switchboard, noop_supervisor):
    client = switchboard.client()
    job_id = submit(client, delay_s=60)
    wait_running(client, job_id)
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_job(client, job_id, timeout=20)
    assert job["phase"] == "canceled"
    assert [p["phase"] for p in job["runs"][0]["phases"]][-2:] == ["terminating", "canceled"]
    # Cancelling again is harmless.
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").json()["phase"] == "canceled"


def test_selector_places_jobs_only_on_matching_supervisors(switchboard, noop_supervisor, work_dir):
    client = switchboard.client()
    other = start_supervisor(
        switchboard, work_dir, name="arm-1", backend="noop", labels={"arch": "arm"}
    )
    try:
        wait_connected(client, "arm-1")
        response = client.post(
            "/api/v1/jobs",
            json={
                "name": "arm only",
                "backend": {"kind": "noop"},
                "selector": {"match_labels": {"arch": "arm"}},
            },
        )
        job = wait_job(client, response.json()["id"])
        assert job["runs"][0]["supervisor_id"] == "arm-1"
    finally:
        other.stop()


def test_switchboard_killed_mid_job_loses_nothing(switchboard, noop_supervisor):
    """SIGKILL the server while a job runs; the supervisor reconnects (backoff), resends
    what was not acknowledged, and the job completes with its output."""
    client = switchboard.client()
    job_id = submit(client, delay_s=2.0, output="before the crash\n")
    wait_running(client, job_id)
    switchboard.kill_and_restart()
    client = switchboard.client()
    job = wait_job(client, job_id, timeout=40)
    assert job["phase"] == "succeeded"
    phases = [p["phase"] for p in job["runs"][0]["phases"]]
    assert phases == ["assigned", "initializing", "running", "succeeded"]
    assert client.get(f"/api/v1/jobs/{job_id}/output").content == b"before the crash\n"
    # And the reconnected supervisor takes new work.
    assert wait_job(client, submit(client))["phase"] == "succeeded"


def test_follow_streams_output_live_until_the_run_ends(switchboard, noop_supervisor):
    client = switchboard.client()
    job_id = submit(client, delay_s=1.0, output="first line\n")
    received: list[tuple[float, bytes]] = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/output/follow") as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received.append((time.monotonic(), chunk))
    ended = time.monotonic()
    assert b"".join(c for _, c in received) == b"first line\n"
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["phase"] == "succeeded"  # the response ended with the run
    assert ended - received[0][0] > 0.5  # the bytes came while the job still ran


def test_follow_from_an_offset_of_an_ended_job(switchboard, noop_supervisor):
    client = switchboard.client()
    job_id = submit(client, output="0123456789")
    wait_job(client, job_id)
    response = client.get(f"/api/v1/jobs/{job_id}/output/follow", params={"start": 4})
    assert response.content == b"456789"
    assert client.get("/api/v1/jobs/nope/output/follow").status_code == 404
