"""Artifacts on a PostgreSQL store with replicas that share no data dir (real processes on
the private cluster of tests/postgres.py): bytes uploaded through one replica are in the
database's chunks, and another serves them, to a client or to the supervisor it holds;
each replica caches what it read (hits counted), within its cap (the least recently read
go), never serving an artifact the index no longer has; an artifact indexed without
chunks (a schema-13 upload) is imported by the replica whose data dir holds it
(docs/deployment.md, "Several replicas on one PostgreSQL database")."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.harness import Switchboard, start_supervisor, wait_connected, wait_for, wait_job
from tests.postgres import (
    Cluster,
    postgres_fixture,  # noqa: F401 - one cluster per session
)
from tests.replicas import start_replicas, stop
from tests.scrape import sample_value, scrape
from tests.test_outputs_supervisor_e2e import LOG, WRITE_OUTPUTS
from tests.wasi import compile_c

pytestmark = pytest.mark.postgres

_names = itertools.count()
MIB = 1024 * 1024


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _cached(replica: Switchboard, digest: str) -> Path:
    return replica.data_dir / "artifacts" / "sha256" / digest.partition(":")[2]


def _cache(replica: Switchboard, result: str) -> float:
    text = scrape(f"{replica.url}/metrics")
    return sample_value(text, "switchboard_artifact_cache_total", result=result)


def _evicted(replica: Switchboard, why: str) -> float:
    text = scrape(f"{replica.url}/metrics")
    return sample_value(text, "switchboard_artifact_cache_evictions_total", why=why)


def _upload(replica: Switchboard, body: bytes) -> str:
    stored = replica.client().post("/api/v1/artifacts", content=body)
    assert stored.status_code == 201, stored.text
    assert stored.json()["digest"] == _digest(body)
    return str(stored.json()["digest"])


def _sql(dsn: str, query: str, *args: object) -> str:
    async def run() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.execute(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def _memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the last reset), in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def test_a_module_uploaded_through_one_replica_runs_on_a_supervisor_of_another(
    tmp_path, postgres: Cluster
):
    dsn = postgres.new_database(f"replica_artifacts_{next(_names)}")
    a, b = start_replicas(tmp_path, dsn, 2)
    sup = start_supervisor(b, tmp_path, name="on-b", backend="wasm")
    try:
        assert a.data_dir != b.data_dir and not b.data_dir.is_symlink()
        wasm = compile_c(WRITE_OUTPUTS, tmp_path, "write_outputs").read_bytes()
        module = _upload(a, wasm)
        client_a = a.client()
        wait_connected(client_a, "on-b")
        spec = {
            "name": "writes-outputs",
            "backend": {"kind": "wasm", "module": module, "args": ["1"]},
            "outputs": {"paths": ["logs/*.log"], "when": "on_failure"},
        }
        submitted = client_a.post("/api/v1/jobs", json=spec)
        assert submitted.status_code == 201, submitted.text
        job = wait_job(client_a, submitted.json()["id"], timeout=120)
        # Fetched by the supervisor from b, which had never seen it: from the chunks.
        assert job["phase"] == "failed" and job["runs"][0]["exit_code"] == 1, job
        assert _cache(b, "miss") == 1
        fetched = b.client().get(f"/api/v1/artifacts/{module}")
        assert fetched.status_code == 200, fetched.text
        assert fetched.content == wasm
        assert _cache(b, "hit") == 1
        # The output file the supervisor uploaded through b, read through a.
        got = client_a.get(f"/api/v1/jobs/{job['id']}/files/logs/a.log")
        assert got.status_code == 200, got.text
        assert got.content == LOG
        assert _cached(a, _digest(LOG)).read_bytes() == LOG
    finally:
        sup.stop()
        stop(*(r for r in (a, b) if r is not None))


def _pattern(size: int) -> Iterator[bytes]:
    """`size` bytes that are not all alike, a MiB at a time (never all in memory)."""
    block = hashlib.sha256(b"seed").digest() * (MIB // 32)
    for offset in range(0, size, MIB):
        yield bytes((x + offset // MIB) & 0xFF for x in block[: min(MIB, size - offset)])


def test_a_large_artifact_streams_through_both_replicas_with_bounded_memory(
    tmp_path, postgres: Cluster
):
    size = 24 * MIB + 12345
    hasher = hashlib.sha256()
    for piece in _pattern(size):
        hasher.update(piece)
    digest = "sha256:" + hasher.hexdigest()
    dsn = postgres.new_database(f"replica_artifacts_{next(_names)}")
    a, b = start_replicas(tmp_path, dsn, 2)
    try:
        pid_a, pid_b = a.process.proc.pid, b.process.proc.pid
        # A few small requests first, so the peaks below are the big artifact's only.
        small = _upload(a, os.urandom(4096))
        assert b.client().get(f"/api/v1/artifacts/{small}").status_code == 200
        _reset_peak(pid_a)
        before_a = _memory(pid_a)
        stored = a.client().post("/api/v1/artifacts", content=_pattern(size))
        assert stored.status_code == 201, stored.text
        assert stored.json()["digest"] == digest
        grown_a = _memory(pid_a)["VmHWM"] - before_a["VmRSS"]

        _reset_peak(pid_b)
        before_b = _memory(pid_b)
        got = hashlib.sha256()
        received = 0
        with (
            b.client() as client,
            client.stream("GET", f"/api/v1/artifacts/{digest}") as response,
        ):
            assert response.status_code == 200
            for piece in response.iter_bytes():
                got.update(piece)
                received += len(piece)
        grown_b = _memory(pid_b)["VmHWM"] - before_b["VmRSS"]
        assert (received, "sha256:" + got.hexdigest()) == (size, digest)
        # Neither replica held the artifact: each grew by a small part of it at most.
        assert grown_a < size / 4, (grown_a, size)
        assert grown_b < size / 4, (grown_b, size)
        assert (_cache(b, "miss"), _cache(b, "hit")) == (2, 0)
        assert _cached(b, digest).stat().st_size == size

        # Read again: from b's cache; a range of it too.
        whole = b.client().get(f"/api/v1/artifacts/{digest}")
        assert _digest(whole.content) == digest
        part = b.client().get(f"/api/v1/artifacts/{digest}", headers={"Range": "bytes=5-20"})
        assert part.status_code == 206
        assert part.content == whole.content[5:21]
        assert (_cache(b, "miss"), _cache(b, "hit")) == (2, 2)
    finally:
        stop(*(r for r in (a, b) if r is not None))


def _replica(tmp_path: Path, dsn: str, name: str, *extra: str) -> Switchboard:
    """One more replica beside those of start_replicas (the same secret key)."""
    key = tmp_path / "replicas.key"
    return Switchboard(
        tmp_path / f"data-{name}",
        extra_args=("--replica-id", name, "--secret-key-file", str(key), *extra),
        database=dsn,
    )


def _leading(replica: Switchboard) -> bool:
    try:
        return sample_value(scrape(f"{replica.url}/metrics"), "switchboard_leader") == 1
    except (httpx.HTTPError, AssertionError):
        return False


def test_an_artifact_retention_deletes_on_one_replica_is_not_served_by_another(
    tmp_path, postgres: Cluster
):
    dsn = postgres.new_database(f"replica_artifacts_{next(_names)}")
    retention = ("--retain-artifacts", "4s", "--retention-interval", "0.5")
    (a,) = start_replicas(tmp_path, dsn, 1, *retention)
    b = None
    try:
        wait_for(lambda: _leading(a), "a leads (retention runs there)")
        b = _replica(tmp_path, dsn, "b", *retention)
    except BaseException:
        stop(a)
        raise
    try:
        body = os.urandom(100_000)
        digest = _upload(a, body)
        assert b.client().get(f"/api/v1/artifacts/{digest}").content == body
        assert _cached(b, digest).read_bytes() == body
        # a deletes it (no job names it, nobody used it for 4 s): b serves it no more.
        wait_for(
            lambda: a.client().get(f"/api/v1/artifacts/{digest}").status_code == 404,
            "retention deleted the artifact",
            timeout=30,
        )
        assert not _cached(a, digest).exists()
        assert _evicted(a, "deleted") == 1
        assert _cached(b, digest).exists()  # until b is asked for it
        gone = b.client().get(f"/api/v1/artifacts/{digest}")
        assert gone.status_code == 404, gone.text
        assert not _cached(b, digest).exists()
        assert _evicted(b, "deleted") == 1
        assert _sql(dsn, "DELETE FROM artifact_chunks WHERE digest = $1", digest) == "DELETE 0"
    finally:
        stop(*(r for r in (a, b) if r is not None))


def test_each_replica_keeps_its_cache_under_its_cap_least_recently_read_first(
    tmp_path, postgres: Cluster
):
    dsn = postgres.new_database(f"replica_artifacts_{next(_names)}")
    (a,) = start_replicas(tmp_path, dsn, 1, "--artifacts-quota", "5M")
    b = _replica(tmp_path, dsn, "b", "--artifact-cache", "3M")
    try:
        bodies = [os.urandom(MIB + 200_000) for _ in range(3)]
        first, second, third = (_upload(a, body) for body in bodies)
        client = b.client()
        for digest in (first, second, first, third):  # `second` is read least recently
            assert _digest(client.get(f"/api/v1/artifacts/{digest}").content) == digest
        assert (_cache(b, "miss"), _cache(b, "hit")) == (3, 1)
        assert _cached(b, first).exists() and _cached(b, third).exists()
        assert not _cached(b, second).exists()
        assert _evicted(b, "cap") == 1
        metrics = scrape(f"{b.url}/metrics")
        assert sample_value(metrics, "switchboard_artifact_cache_bytes") == 2 * len(bodies[0])
        # Evicted is not gone: read again, from the chunks.
        assert client.get(f"/api/v1/artifacts/{second}").content == bodies[1]
        assert _cache(b, "miss") == 4
        # An upload past the quota leaves no chunk behind (they are written first).
        over = os.urandom(2 * MIB)
        refused = a.client().post("/api/v1/artifacts", content=over)
        assert refused.status_code == 507, refused.text
        left = _sql(dsn, "DELETE FROM artifact_chunks WHERE digest = $1", _digest(over))
        assert left == "DELETE 0"
        assert not _cached(a, _digest(over)).exists()
    finally:
        stop(a, b)


def test_an_artifact_indexed_without_chunks_is_imported_by_the_replica_holding_its_file(
    tmp_path, postgres: Cluster
):
    # As a database upgraded from schema version 13 has them: the index row, and the bytes
    # only as a file in the data dir of the replica that took the upload.
    dsn = postgres.new_database(f"replica_artifacts_{next(_names)}")
    a, b = start_replicas(tmp_path, dsn, 2)
    try:
        body = os.urandom(3 * MIB + 5)
        digest = _upload(a, body)
        other = _upload(a, os.urandom(1000))
        for gone in (digest, other):
            _sql(dsn, "DELETE FROM artifact_chunks WHERE digest = $1", gone)
        _cached(a, other).write_bytes(bytes(1000))  # not those bytes
        a.restart()  # as after an upgrade: nothing known of the chunks yet
        missing = b.client().get(f"/api/v1/artifacts/{digest}")
        assert missing.status_code == 404, missing.text
        wait_for(lambda: "its bytes are in no chunk" in b.process.log(), "b said why")
        # a holds the file: it serves it, and imports it into the chunks first.
        assert a.client().get(f"/api/v1/artifacts/{digest}").content == body
        assert b.client().get(f"/api/v1/artifacts/{digest}").content == body
        # A file that is not the digest's bytes is never imported, nor served.
        assert a.client().get(f"/api/v1/artifacts/{other}").status_code == 404
        assert not _cached(a, other).exists()
        assert "is not its bytes" in a.process.log()
    finally:
        stop(a, b)
