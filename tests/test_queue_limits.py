"""The queue's bound: past `--max-queued` waiting jobs a submission is refused with 429 and
nothing of it is stored; a batch that would cross the bound is refused whole."""

from __future__ import annotations

import pytest

from tests.harness import Switchboard

pytestmark = pytest.mark.process

NOOP = {"name": "waits", "backend": {"kind": "noop"}}


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("queue") / "data", extra_args=("--max-queued", "3")
    )
    yield server
    server.stop()


def test_a_full_queue_refuses_with_429_and_stores_nothing(small_queue):
    client = small_queue.client()
    # No supervisor is connected, so every job stays queued.
    ids = [client.post("/api/v1/jobs", json=NOOP).json()["id"] for _ in range(2)]
    too_many = client.post("/api/v1/jobs/batch", json=[NOOP, NOOP])
    assert too_many.status_code == 429
    assert too_many.json()["error"] == "queue_full"
    assert client.post("/api/v1/jobs", json=NOOP).status_code == 201
    refused = client.post("/api/v1/jobs", json=NOOP)
    assert refused.status_code == 429 and refused.json()["error"] == "queue_full"
    listed = client.get("/api/v1/jobs").json()["items"]
    assert len(listed) == 3 and {j["id"] for j in listed} >= set(ids)
    assert client.get("/api/v1/dispatch").json()["queued"] == 3

    # Room again once a job leaves the queue.
    assert client.post(f"/api/v1/jobs/{ids[0]}/cancel").status_code == 202
    assert client.post("/api/v1/jobs", json=NOOP).status_code == 201
