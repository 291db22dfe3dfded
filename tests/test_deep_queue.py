"""No head-of-line blocking however deep the queue: thousands of higher-priority jobs that
no supervisor can take (more than the dispatcher reads at a time) never keep a job that can
run from running, before or after a restart; and once a supervisor can take them, they run."""

from __future__ import annotations

import pytest

from switchboard.dispatcher import QUEUE_WINDOW
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_for, wait_job

pytestmark = pytest.mark.process

STUCK = 3 * QUEUE_WINDOW + 500


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sb = Switchboard(tmp_path_factory.mktemp("deep") / "data")
    yield sb
    sb.stop()


def _runnable(client) -> str:
    made = client.post("/api/v1/jobs", json={"name": "runs", "backend": {"kind": "noop"}})
    assert made.status_code == 201, made.text
    return made.json()["id"]


def test_jobs_nobody_can_run_never_block_the_queue(server, tmp_path):
    client = server.client()
    stuck = {
        "name": "stuck",
        "priority": 9,
        "selector": {"match_labels": {"pool": "gpu"}},
        "backend": {"kind": "noop"},
    }
    for _ in range(STUCK // 500):
        response = client.post("/api/v1/jobs/batch", json=[stuck] * 500)
        assert response.status_code == 201, response.text
    supervisor = start_supervisor(server, tmp_path, name="deep-noop", backend="noop")
    try:
        wait_connected(client, "deep-noop")
        assert wait_job(client, _runnable(client))["phase"] == "succeeded"
        # The stuck ones say why they wait.
        page = client.get("/api/v1/jobs", params={"q": "stuck", "limit": 5}).json()["items"]
        assert all("pool=gpu" in (job["unschedulable"] or "") for job in page)

        server.kill_and_restart()
        wait_connected(client, "deep-noop", timeout=40)
        assert wait_job(client, _runnable(client))["phase"] == "succeeded"

        # A supervisor that can take them appears (here: the operator labels one): they run.
        labelled = client.put(
            "/api/v1/supervisors/deep-noop/labels", json={"labels": {"pool": "gpu"}}
        )
        assert labelled.status_code == 200
        wait_for(
            lambda: client.get("/api/v1/jobs", params={"q": "stuck", "phase": "succeeded"}).json()[
                "items"
            ],
            "a stuck job to run once a supervisor matches",
            timeout=40,
        )
    finally:
        supervisor.stop()
