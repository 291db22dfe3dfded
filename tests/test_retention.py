"""Retention: ended jobs are deleted after --retain-jobs, and all output together is kept
under --max-output-bytes by removing the output of the jobs that ended first, in short
write transactions. On the store (SQLite on disk) and end to end (a real switchboard and
supervisor; real time, short settings)."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from protocol.state import Phase
from switchboard.artifact_blobs import FileBlobs
from switchboard.artifacts import ArtifactFiles
from switchboard.config import Settings
from switchboard.retention import Retention
from switchboard.store.sqlite import SQLiteStore
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_for, wait_job
from tests.scrape import sample_value, scrape
from tests.store_setup import assigned_job, out, state

CHUNK = 1000


async def _ended_job(store: SQLiteStore, job_id: str, chunks: int, seq: int) -> int:
    """A job that wrote `chunks` pieces of CHUNK bytes and succeeded; returns the next seq."""
    await assigned_job(store, job_id)
    events = [state(seq, Phase.RUNNING, job=job_id)]
    for n in range(chunks):
        events.append(out(seq + 1 + n, n * CHUNK, bytes([65 + n % 26]) * CHUNK, job=job_id))
    events.append(state(seq + 1 + chunks, Phase.SUCCEEDED, job=job_id))
    await store.apply_events("s1", events)
    return seq + 2 + chunks


def _rows(store: SQLiteStore, job_id: str) -> int:
    conn = sqlite3.connect(store.path)
    try:
        return conn.execute("SELECT count(*) FROM output WHERE job_id = ?", (job_id,)).fetchone()[0]
    finally:
        conn.close()


@pytest.mark.unit
async def test_output_is_dropped_a_bounded_batch_at_a_time(store):
    await _ended_job(store, "big", 10, 1)
    assert await store.stored_output_bytes() == 10 * CHUNK
    freed = await store.drop_output("big", 4, "too much")
    assert freed == 4 * CHUNK and _rows(store, "big") == 6  # one transaction, 4 pieces
    assert await store.stored_output_bytes() == 6 * CHUNK
    assert await store.drop_output("big", 4, "too much") == 4 * CHUNK
    assert await store.drop_output("big", 4, "too much") == 2 * CHUNK  # the last ones
    assert await store.drop_output("big", 4, "too much") == 0
    assert await store.stored_output_bytes() == 0
    events = await store.job_events("big")
    assert [e.message for e in events if e.kind == "output_removed"] == ["too much"]
    job = await store.get_job("big")
    assert job.phase == Phase.SUCCEEDED and job.runs[0].output_bytes == 0


@pytest.mark.unit
async def test_an_active_jobs_output_is_never_dropped(store):
    await assigned_job(store, "live")
    await store.apply_events(
        "s1", [state(1, Phase.RUNNING, job="live"), out(2, 0, b"x" * 10, job="live")]
    )
    assert await store.drop_output("live", 100) == 0
    assert await store.read_output("live", 1, "stdout") == b"x" * 10
    assert await store.ended_jobs(limit=10) == []


@pytest.mark.unit
async def test_a_sweep_removes_the_output_of_the_jobs_that_ended_first(store, tmp_path):
    seq = 1
    for job_id in ("first", "second", "third", "fourth"):
        seq = await _ended_job(store, job_id, 3, seq)
    settings = Settings(retain_jobs_s=0, max_output_bytes=7 * CHUNK)
    retention = Retention(store, FileBlobs(store, ArtifactFiles(tmp_path / "artifacts")), settings)
    swept = await retention.sweep()
    # 12 pieces stored, 7 allowed: the first two jobs' output goes, whole.
    assert (swept.jobs, swept.outputs, swept.output_bytes) == (0, 2, 6 * CHUNK)
    assert [_rows(store, j) for j in ("first", "second", "third", "fourth")] == [0, 0, 3, 3]
    assert await store.stored_output_bytes() == 6 * CHUNK
    assert await store.get_job("first") is not None  # the record stays
    assert (await retention.sweep()).outputs == 0  # under the cap now


@pytest.mark.unit
async def test_a_sweep_deletes_jobs_ended_longer_ago_than_kept(store, tmp_path):
    seq = await _ended_job(store, "old", 3, 1)
    await _ended_job(store, "new", 1, seq)
    ended = {job: (await store.get_job(job)).updated_at for job in ("old", "new")}
    assert await store.ended_jobs(limit=10) == ["old", "new"]
    assert await store.ended_jobs(ended_before=ended["new"], limit=10) == ["old"]

    settings = Settings(retain_jobs_s=1e-9, max_output_bytes=0)
    swept = await Retention(
        store, FileBlobs(store, ArtifactFiles(tmp_path / "artifacts")), settings
    ).sweep()
    assert swept.jobs == 2
    assert await store.get_job("old") is None and await store.get_job("new") is None
    assert _rows(store, "old") == 0


# --- end to end ------------------------------------------------------------------------


def _noop(client: httpx.Client, name: str, output: str, delay_s: float = 0.0) -> str:
    spec = {"name": name, "backend": {"kind": "noop", "output": output, "delay_s": delay_s}}
    response = client.post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.process
def test_all_output_is_kept_under_its_cap(tmp_path):
    server = Switchboard(
        tmp_path / "data",
        extra_args=("--max-output-bytes", "6000", "--retention-interval", "0.3"),
    )
    supervisor = start_supervisor(server, tmp_path, name="keep-noop", backend="noop", max_jobs=1)
    try:
        client = server.client()
        wait_connected(client, "keep-noop")
        jobs = []
        for n in range(4):  # 4 x 2500 bytes, one after another
            jobs.append(_noop(client, f"out-{n}", str(n) * 2500))
            assert wait_job(client, jobs[-1])["phase"] == "succeeded"

        def outputs() -> list[int]:
            return [len(client.get(f"/api/v1/jobs/{j}/output").content) for j in jobs]

        wait_for(lambda: outputs() == [0, 0, 2500, 2500], "the oldest outputs to go")
        for job_id in jobs[:2]:
            events = client.get(f"/api/v1/jobs/{job_id}/events").json()
            assert any(e["kind"] == "output_removed" for e in events), events
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            assert job["phase"] == "succeeded" and job["runs"][0]["output_bytes"] == 0
        assert client.get(f"/api/v1/jobs/{jobs[3]}/output").content == b"3" * 2500
        text = scrape(f"{server.url}/metrics")
        assert sample_value(text, "switchboard_retention_removed_total", what="output") == 2
        assert sample_value(text, "switchboard_stored_bytes", what="output") == 5000
    finally:
        supervisor.stop()
        server.stop()


@pytest.mark.process
def test_ended_jobs_are_deleted_after_their_time_and_running_ones_kept(tmp_path):
    server = Switchboard(
        tmp_path / "data", extra_args=("--retain-jobs", "2s", "--retention-interval", "0.3")
    )
    supervisor = start_supervisor(server, tmp_path, name="age-noop", backend="noop")
    try:
        client = server.client()
        wait_connected(client, "age-noop")
        running = _noop(client, "long", "still here\n", delay_s=600)
        done = _noop(client, "short", "bye\n")
        assert wait_job(client, done)["phase"] == "succeeded"
        # Still there right after it ended...
        assert client.get(f"/api/v1/jobs/{done}").status_code == 200
        # ...and gone once its time is up, output and events with it.
        wait_for(lambda: client.get(f"/api/v1/jobs/{done}").status_code == 404, "deletion")
        assert client.get(f"/api/v1/jobs/{done}/events").status_code == 404
        job = client.get(f"/api/v1/jobs/{running}").json()
        assert job["phase"] in ("assigned", "initializing", "running"), job
        assert client.get(f"/api/v1/jobs/{running}/output").content == b"still here\n"
        text = scrape(f"{server.url}/metrics")
        assert sample_value(text, "switchboard_retention_removed_total", what="job") == 1
        assert "retention: deleted 1 jobs" in server.process.log()
        client.post(f"/api/v1/jobs/{running}/cancel")
    finally:
        supervisor.stop()
        server.stop()


@pytest.mark.unit
def test_retention_flags_take_units():
    from switchboard.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--retain-jobs", "7d", "--max-output-bytes", "2G", "--max-run-output", "1M"]
    )
    assert (args.retain_jobs, args.max_output_bytes, args.max_run_output) == (
        7 * 86400,
        2 * 1024**3,
        1024**2,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--retain-jobs", "a week"])
    # 0 keeps jobs for ever; but sweeping every 0 s would sweep without a pause.
    assert build_parser().parse_args(["serve", "--retain-jobs", "0"]).retain_jobs == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--retention-interval", "0"])
