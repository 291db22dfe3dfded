"""A supervisor that vanishes (SIGKILL) doesn't hold its jobs forever: after the grace
period its runs are lost."""

from __future__ import annotations

import time

import pytest

from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job, wait_running

GRACE = 1.0


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("lost") / "data",
        extra_args=(
            "--lost-after",
            str(GRACE),
            "--heartbeat-interval",
            "0.2",
            "--heartbeat-timeout",
            "1",
        ),
    )
    yield server
    server.stop()


def test_runs_of_a_killed_supervisor_become_lost(switchboard, work_dir):
    client = switchboard.client()
    sup = start_supervisor(switchboard, work_dir, name="doomed", backend="noop")
    wait_connected(client, "doomed")
    job_id = client.post(
        "/api/v1/jobs", json={"name": "long", "backend": {"kind": "noop", "delay_s": 600}}
    ).json()["id"]
    wait_running(client, job_id)
    sup.kill()
    killed = time.monotonic()
    job = wait_job(client, job_id, timeout=30)
    detected = time.monotonic() - killed
    assert job["phase"] == "lost"
    assert GRACE <= detected < GRACE + 10
    print(f"run lost {detected:.2f}s after the supervisor was killed (grace {GRACE}s)")


def test_with_on_failure_a_lost_job_runs_to_success_elsewhere(switchboard, work_dir):
    client = switchboard.client()
    first = start_supervisor(
        switchboard, work_dir, name="goner", backend="noop", labels={"pool": "a"}
    )
    wait_connected(client, "goner")
    job_id = client.post(
        "/api/v1/jobs",
        json={
            "name": "resilient",
            "backend": {"kind": "noop", "delay_s": 1.0, "output": "done\n"},
            "selector": {"match_expressions": [{"key": "pool", "operator": "Exists"}]},
            "restart": {
                "policy": "on_failure",
                "max_restarts": 2,
                "backoff": {"first_s": 0.1, "jitter": "none"},
            },
        },
    ).json()["id"]
    wait_running(client, job_id)
    first.kill()
    second = start_supervisor(
        switchboard, work_dir, name="survivor", backend="noop", labels={"pool": "b"}
    )
    try:
        job = wait_job(client, job_id, timeout=60)
        assert job["phase"] == "succeeded"
        assert [(r["supervisor_id"], r["phase"]) for r in job["runs"]] == [
            ("goner", "lost"),
            ("survivor", "succeeded"),
        ]
        assert client.get(f"/api/v1/jobs/{job_id}/output").content == b"done\n"
    finally:
        second.stop()
