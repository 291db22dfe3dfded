"""A job whose StartJob would not fit in one protocol message (1 MiB) is refused at
submission, naming the limit; one that got into the store anyway is never sent: its run
ends rejected with the reason, and no supervisor's connection is cut for it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from protocol import limits
from protocol.spec import JobSpec, NoopBackend, Parameter
from switchboard.store.sqlite import SQLiteStore
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job
from tests.scrape import sample_value, scrape

pytestmark = pytest.mark.process

LIMIT = limits.MAX_FRAME_BYTES
#: What a StartJob adds to the spec fields it carries (name, backend, parameters), with
#: the longest job id (64 characters) and attempt (2**63 - 1) the protocol allows.
WORST_ENVELOPE = len('"type":"start_job","job_id":"","attempt":9223372036854775807,') + 64
#: The same with a job id the switchboard makes (24 characters) and attempt 1.
REAL_ENVELOPE = len('"type":"start_job","job_id":"","attempt":1,') + 24


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _spec_of_size(size: int) -> dict:
    """A no-op job spec whose compact JSON is exactly `size` bytes, nearly all of it in
    parameters (which its StartJob carries as they are). It names its own timeout, so
    the switchboard's default (written into specs that name none) adds nothing."""
    params = {f"P{i:02d}": {"value": "a" * 65536} for i in range(15)}
    spec = {"name": "p", "backend": {"kind": "noop"}, "timeout_s": 60.0, "parameters": params}
    params["P15"] = {"value": ""}
    params["P15"]["value"] = "a" * (size - len(_compact(spec)))
    assert len(_compact(spec)) == size
    return spec


def _post(client, path: str, body: object):
    return client.post(path, content=_compact(body), headers={"content-type": "application/json"})


def _too_large(switchboard: Switchboard) -> float:
    return sample_value(scrape(f"{switchboard.url}/metrics"), "switchboard_specs_too_large_total")


def test_a_spec_too_large_for_one_message_is_400_naming_the_limit(switchboard, work_dir):
    client = switchboard.client()
    sup = start_supervisor(switchboard, work_dir, name="poison-0", backend="noop")
    try:
        wait_connected(client, "poison-0")
        before = _too_large(switchboard)
        # Within the request limit (1 MiB), but its StartJob would be over the message
        # limit even with the id and attempt it would really get.
        size = LIMIT - REAL_ENVELOPE + 10
        assert size <= LIMIT
        response = _post(client, "/api/v1/jobs", _spec_of_size(size))
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["error"] == "invalid_spec"
        assert f"{LIMIT} bytes" in error["message"] and "start_job" in error["message"]
        assert f"would be {size + WORST_ENVELOPE} bytes" in error["message"]
        # In a batch, the job is named by its index, and nothing of the batch is stored.
        count = len(client.get("/api/v1/jobs").json()["items"])
        batch = [{"name": "fine", "backend": {"kind": "noop"}}, _spec_of_size(LIMIT - 100)]
        response = _post(client, "/api/v1/jobs/batch", batch)
        assert response.status_code == 400, response.text
        assert response.json()["field"] == "[1]"
        assert response.json()["message"].startswith("[1].")
        assert len(client.get("/api/v1/jobs").json()["items"]) == count
        assert _too_large(switchboard) == before + 2
        # The largest spec the check lets through is delivered and runs.
        largest = _spec_of_size(LIMIT - WORST_ENVELOPE)
        response = _post(client, "/api/v1/jobs", largest)
        assert response.status_code == 201, response.text
        assert wait_job(client, response.json()["id"])["phase"] == "succeeded"
        response = _post(client, "/api/v1/jobs", _spec_of_size(LIMIT - WORST_ENVELOPE + 1))
        assert response.status_code == 400
    finally:
        sup.stop()


def _big_spec() -> JobSpec:
    """Valid, but its StartJob is over the message limit (17 parameters of 64 KiB)."""
    params = {f"P{i:02d}": Parameter(value="b" * 65536) for i in range(17)}
    return JobSpec(name="poison", backend=NoopBackend(), parameters=params)


async def _plant(db: Path) -> None:
    """Behind the API's back: a queued oversized job, and one already assigned to the
    supervisor `poisoned` (whose reconnect must (re)send it), plus a fine one."""
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.create_job("poison-queued", _big_spec())
        await store.create_job("poison-assigned", _big_spec())
        assert await store.assign([("poison-assigned", "poisoned")])
        await store.create_job("fine", JobSpec(name="fine", backend=NoopBackend()))
    finally:
        await store.close()


def test_an_oversized_job_in_the_store_ends_rejected_and_cuts_no_one(tmp_path):
    server = Switchboard(tmp_path / "data", extra_args=("--heartbeat-interval", "0.5"))
    client = server.client()
    sup = start_supervisor(server, tmp_path, name="poisoned", backend="noop")
    try:
        wait_connected(client, "poisoned")
        sup.stop()
        server.stop()
        asyncio.run(_plant(server.data_dir / "switchboard.sqlite3"))
        server.start()
        client = server.client()
        sup = start_supervisor(server, tmp_path, name="poisoned", backend="noop")
        wait_connected(client, "poisoned")
        for job_id in ("poison-queued", "poison-assigned"):
            job = wait_job(client, job_id)
            assert job["phase"] == "rejected", job["runs"]
            assert len(job["runs"]) == 1  # not restarted, not resent
            message = job["runs"][0]["message"]
            assert "not sent" in message and f"{LIMIT} bytes" in message, message
        assert wait_job(client, "fine")["phase"] == "succeeded"
        text = scrape(f"{server.url}/metrics")
        assert sample_value(text, "switchboard_runs_undeliverable_total") == 2
        # The supervisor's connection was never cut: the session it opened after the
        # restart is still open, and it runs the next job.
        connections = client.get("/api/v1/supervisors/poisoned/connections").json()
        assert connections[0]["disconnected_at"] is None
        assert connections[0]["session"] == connections[1]["session"] + 1
        after = client.post(
            "/api/v1/jobs", json={"name": "after", "backend": {"kind": "noop"}}
        ).json()["id"]
        assert wait_job(client, after)["phase"] == "succeeded"
        view = client.get("/api/v1/supervisors/poisoned").json()
        assert view["connected"] and view["session"] == connections[0]["session"]
    finally:
        sup.stop()
        server.stop()
