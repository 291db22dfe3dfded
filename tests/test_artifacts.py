"""Artifacts: deleting one (refused while a job that has not ended names it; a submitter only
its own), the quota on all artifacts together, and retention of those no job needs. On the
store (SQLite on disk) and end to end (a real switchboard)."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import time

import httpx
import pytest

from protocol.spec import DockerBackend, JobSpec, WasmBackend
from switchboard.store.errors import ArtifactMissing
from switchboard.store.sqlite import SQLiteStore
from tests.harness import Switchboard, wait_for
from tests.scrape import sample_value, scrape


def _digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _wasm(digest: str, name: str = "w") -> JobSpec:
    return JobSpec(name=name, backend=WasmBackend(module=digest))


@pytest.mark.unit
async def test_the_quota_refuses_new_bytes_but_not_the_same_again(store):
    a, b = _digest(b"a"), _digest(b"b")
    assert (await store.add_artifact(a, 600, "t1", quota=1000)).outcome == "added"
    refused = await store.add_artifact(b, 600, "t1", quota=1000)
    assert (refused.outcome, refused.stored_bytes) == ("full", 600)
    assert await store.get_artifact(b) is None
    assert (await store.add_artifact(a, 600, "t2", quota=1000)).outcome == "exists"
    assert (await store.get_artifact(a)).uploaded_by == "t1"  # the first uploader
    assert await store.stored_artifact_bytes() == 600


@pytest.mark.unit
async def test_a_job_naming_a_missing_artifact_is_refused_with_its_batch(store):
    there = _digest(b"there")
    await store.add_artifact(there, 5)
    jobs = [("j1", _wasm(there)), ("j2", _wasm(_digest(b"nowhere")))]
    with pytest.raises(ArtifactMissing) as missing:
        await store.create_jobs(jobs, "me", max_queued=100)
    assert (missing.value.index, missing.value.field) == (1, "backend.module")
    assert await store.get_job("j1") is None  # all or none


@pytest.mark.unit
async def test_an_artifact_a_job_needs_is_not_deleted(store):
    module, image = _digest(b"module"), _digest(b"image")
    for digest in (module, image):
        await store.add_artifact(digest, 10)
    docker = JobSpec(name="d", backend=DockerBackend(image_artifact=image))
    await store.create_jobs([("w", _wasm(module)), ("d", docker)], "me", max_queued=100)
    for digest, job_id in ((module, "w"), (image, "d")):
        refused = await store.delete_artifact(digest)
        assert (refused.outcome, refused.needed_by) == ("in_use", [job_id])
    assert await store.unused_artifacts(time.time() + 1, 10) == []
    await store.request_cancel("w")
    assert (await store.delete_artifact(module)).outcome == "deleted"
    assert (await store.delete_artifact(module)).outcome == "absent"
    with pytest.raises(ArtifactMissing):  # gone: new jobs may not name it
        await store.create_job("again", _wasm(module))


@pytest.mark.unit
async def test_unused_means_not_uploaded_nor_named_by_a_job_since(store):
    old, named = _digest(b"old"), _digest(b"named")
    await store.add_artifact(old, 1)
    await store.add_artifact(named, 1)
    await store.create_job("q", _wasm(named))
    await store.request_cancel("q")  # ended: named no more, but named lately
    later = time.time() + 0.001
    assert await store.unused_artifacts(later, 10) == [old, named]
    ended = (await store.get_job("q")).updated_at
    assert await store.unused_artifacts(ended, 10) == [old]  # named by a job ending then
    # Retention's delete checks again, in the writer: a use since then keeps it.
    await store.add_artifact(old, 1)  # uploaded again: a use
    assert (await store.delete_artifact(old, unused_before=later)).outcome == "used_lately"
    assert (await store.delete_artifact(named, unused_before=later)).outcome == "deleted"


@pytest.mark.unit
async def test_an_older_database_learns_which_jobs_name_which_artifacts(tmp_path):
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    module = _digest(b"m")
    await old.add_artifact(module, 1)
    await old.create_job("w", _wasm(module))
    await old.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        # The tables as version 3 had them.
        "DROP TABLE job_artifacts; CREATE TABLE v3 (digest TEXT PRIMARY KEY, size INTEGER"
        " NOT NULL, created_at REAL NOT NULL); INSERT INTO v3 SELECT digest, size, created_at"
        " FROM artifacts; DROP TABLE artifacts; ALTER TABLE v3 RENAME TO artifacts;"
        " PRAGMA user_version = 3;"
    )
    conn.close()
    upgraded = SQLiteStore(path, upgrade=True)
    await upgraded.open()
    try:
        assert (await upgraded.delete_artifact(module)).needed_by == ["w"]
    finally:
        await upgraded.close()


# --- end to end ------------------------------------------------------------------------

QUOTA = 3000


@pytest.fixture(scope="module")
def quota_switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("artifacts") / "data",
        extra_args=("--artifacts-quota", str(QUOTA), "--retention-interval", "3600"),
    )
    yield server
    server.stop()


def _token(server: Switchboard, role: str) -> httpx.Client:
    made = server.client().post("/api/v1/tokens", json={"role": role, "name": role})
    return server.client(made.json()["token"])


def _refusals(server: Switchboard, why: str) -> float:
    return sample_value(
        scrape(f"{server.url}/metrics"), "switchboard_artifact_refusals_total", why=why
    )


@pytest.mark.process
def test_uploads_past_the_quota_get_507_and_the_same_bytes_still_pass(quota_switchboard):
    server = quota_switchboard
    client = _token(server, "submitter")
    small = client.post("/api/v1/artifacts", content=b"s" * 1000)
    assert small.status_code == 201, small.text
    before = _refusals(server, "quota")
    big = client.post("/api/v1/artifacts", content=b"B" * 2500)
    assert big.status_code == 507
    body = big.json()
    assert body["error"] == "insufficient_storage" and "--artifacts-quota" in body["message"]
    assert client.get(f"/api/v1/artifacts/{_digest(b'B' * 2500)}").status_code == 404
    assert not list((server.data_dir / "artifacts").glob(".upload-*"))  # nothing left over
    assert _refusals(server, "quota") == before + 1
    assert "upload of sha256:" in server.process.log()
    again = client.post("/api/v1/artifacts", content=b"s" * 1000)
    assert again.status_code == 201 and again.json() == small.json()
    client.delete(f"/api/v1/artifacts/{small.json()['digest']}")


@pytest.mark.process
def test_an_upload_larger_than_one_may_be_gets_413_and_is_counted(quota_switchboard):
    server = quota_switchboard
    before = _refusals(server, "too_large")
    token = server.client().headers["authorization"]
    # Announced, not sent: the switchboard answers before reading a byte of it.
    head = (
        "POST /api/v1/artifacts HTTP/1.1\r\nHost: sb\r\nConnection: close\r\n"
        f"Authorization: {token}\r\nContent-Length: {2**31}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"x" * 1024)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error":"too_large"' in answer
    assert _refusals(server, "too_large") == before + 1


@pytest.mark.process
def test_delete_waits_for_the_jobs_naming_it_and_is_the_uploaders(quota_switchboard):
    server = quota_switchboard
    owner, other = _token(server, "submitter"), _token(server, "submitter")
    operator, viewer = _token(server, "operator"), _token(server, "viewer")
    digest = owner.post("/api/v1/artifacts", content=b"module bytes").json()["digest"]
    # No supervisor: the job stays queued, naming the module.
    spec = {"name": "needs-it", "backend": {"kind": "wasm", "module": digest}}
    job_id = owner.post("/api/v1/jobs", json=spec).json()["id"]
    path = f"/api/v1/artifacts/{digest}"

    assert other.delete(path).status_code == 403  # not its upload
    assert viewer.delete(path).status_code == 403  # may not at all
    before = _refusals(server, "in_use")
    refused = operator.delete(path)
    assert refused.status_code == 409
    assert refused.json()["error"] == "artifact_in_use" and job_id in refused.json()["message"]
    assert _refusals(server, "in_use") == before + 1
    assert owner.get(path).status_code == 200  # still there

    owner.post(f"/api/v1/jobs/{job_id}/cancel")
    assert owner.delete(path).status_code == 204
    assert owner.get(path).status_code == 404
    assert owner.delete(path).status_code == 204  # already gone: fine
    assert not (server.data_dir / "artifacts" / "sha256" / digest[7:]).exists()
    resubmitted = owner.post("/api/v1/jobs", json=spec)
    assert resubmitted.status_code == 400
    assert resubmitted.json()["field"] == "backend.module"
    noop = {"name": "ok", "backend": {"kind": "noop"}}
    batch = owner.post("/api/v1/jobs/batch", json=[noop, spec])
    assert batch.status_code == 400 and batch.json()["field"] == "[1].backend.module"
    assert operator.delete("/api/v1/artifacts/sha256:nothex").status_code == 400


@pytest.mark.process
def test_artifacts_no_job_needs_are_forgotten_after_their_time(tmp_path):
    server = Switchboard(
        tmp_path / "data", extra_args=("--retain-artifacts", "2s", "--retention-interval", "0.3")
    )
    try:
        client = server.client()
        unused = client.post("/api/v1/artifacts", content=b"nobody wants me").json()["digest"]
        needed = client.post("/api/v1/artifacts", content=b"a queued job wants me").json()
        spec = {"name": "waits", "backend": {"kind": "wasm", "module": needed["digest"]}}
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]

        def gone(digest: str) -> bool:
            return client.get(f"/api/v1/artifacts/{digest}").status_code == 404

        wait_for(lambda: gone(unused), "the unused artifact to go")
        assert not gone(needed["digest"])  # its job is queued: it stays
        text = scrape(f"{server.url}/metrics")
        assert sample_value(text, "switchboard_retention_removed_total", what="artifact") == 1
        stored = sample_value(text, "switchboard_stored_bytes", what="artifact")
        assert stored == needed["size"]

        client.post(f"/api/v1/jobs/{job_id}/cancel")
        wait_for(lambda: gone(needed["digest"]), "the artifact to go once its job ended")
        assert "retention: deleted 1 artifacts" in server.process.log()
    finally:
        server.stop()
