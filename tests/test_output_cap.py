"""The per-run output cap: a run stores at most so many bytes of output, all streams
together; the stream that crosses it ends with a note, later output is dropped (but still
acknowledged), the run keeps its real outcome and says which streams were cut. On the store
(SQLite on disk) and end to end (a real switchboard and supervisor)."""

from __future__ import annotations

import sqlite3

import pytest
from prometheus_client import generate_latest

from protocol.messages import JobExit
from protocol.state import Phase
from switchboard.metrics import REGISTRY
from switchboard.store.schema import SCHEMA_VERSION
from switchboard.store.sqlite import SQLiteStore
from switchboard.store.sqlite_output import OUTPUT_CUT_NOTE
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job
from tests.scrape import sample_value, scrape
from tests.store_setup import assigned_job, out, state

CAP = 1000
NOTE = OUTPUT_CUT_NOTE.format(cap=CAP).encode()


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "db.sqlite3", max_run_output=CAP)
    await s.open()
    yield s
    await s.close()


def _metric(name: str, stream: str) -> float:
    return sample_value(generate_latest(REGISTRY).decode(), name, stream=stream)


@pytest.mark.unit
async def test_the_stream_crossing_the_cap_is_cut_with_a_note(store):
    await assigned_job(store)
    truncated_before = _metric("switchboard_output_truncated_total", "stdout")
    dropped_before = _metric("switchboard_output_dropped_bytes_total", "stdout")
    applied = await store.apply_events(
        "s1",
        [
            state(1, Phase.RUNNING),
            out(2, 0, b"e" * 300, stream="stderr"),
            out(3, 0, b"a" * 600),
            out(4, 600, b"b" * 600),  # crosses the cap: 100 fit
            out(5, 1200, b"c" * 50),  # dropped
            out(6, 300, b"f" * 10, stream="stderr"),  # the run is full: cut at once
            JobExit(seq=7, job_id="j1", attempt=1, exit_code=0),
            state(8, Phase.SUCCEEDED),
        ],
    )
    assert applied.stored_seq == 8  # everything acknowledged
    stdout = await store.read_output("j1", 1, "stdout")
    assert stdout == b"a" * 600 + b"b" * 100 + NOTE
    assert await store.read_output("j1", 1, "stderr") == b"e" * 300 + NOTE
    job = await store.get_job("j1")
    assert job.phase == Phase.SUCCEEDED and job.exit_code == 0  # the real outcome
    (run,) = job.runs
    assert run.output_truncated == ["stdout", "stderr"]
    assert run.output_bytes == 1000 + 2 * len(NOTE)
    assert _metric("switchboard_output_truncated_total", "stdout") == truncated_before + 1
    assert _metric("switchboard_output_dropped_bytes_total", "stdout") == dropped_before + 550

    # A resend from offset 0 (a recovered run) and more output change nothing.
    await store.apply_events("s1", [out(9, 0, b"a" * 600 + b"b" * 700)])
    assert await store.read_output("j1", 1, "stdout") == stdout


@pytest.mark.unit
async def test_output_under_the_cap_is_kept_whole_across_batches(store):
    await assigned_job(store)
    await store.apply_events("s1", [state(1, Phase.RUNNING), out(2, 0, b"x" * 500)])
    await store.apply_events("s1", [out(3, 500, b"y" * 500)])  # exactly the cap
    job = await store.get_job("j1")
    assert await store.read_output("j1", 1, "stdout") == b"x" * 500 + b"y" * 500
    assert job.runs[0].output_truncated == [] and job.runs[0].output_bytes == 1000
    await store.apply_events("s1", [out(4, 1000, b"z")])  # one byte more: cut
    assert await store.read_output("j1", 1, "stdout") == b"x" * 500 + b"y" * 500 + NOTE


@pytest.mark.unit
async def test_without_a_cap_nothing_is_cut(tmp_path):
    uncapped = SQLiteStore(tmp_path / "db.sqlite3")
    await uncapped.open()
    try:
        await assigned_job(uncapped)
        await uncapped.apply_events("s1", [out(1, 0, b"x" * 5000)])
        assert len(await uncapped.read_output("j1", 1, "stdout")) == 5000
    finally:
        await uncapped.close()


@pytest.mark.unit
async def test_a_version_3_database_gets_the_output_columns_filled_in(tmp_path):
    path = tmp_path / "db.sqlite3"
    old = SQLiteStore(path)
    await old.open()
    await assigned_job(old)
    await old.apply_events("s1", [out(1, 0, b"x" * 700), out(2, 0, b"y" * 20, stream="stderr")])
    await old.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "ALTER TABLE runs DROP COLUMN output_bytes; ALTER TABLE runs DROP COLUMN"
        " output_truncated; PRAGMA user_version = 3;"
    )
    conn.close()
    upgraded = SQLiteStore(path, max_run_output=CAP, upgrade=True)
    await upgraded.open()
    try:
        assert (await upgraded.get_job("j1")).runs[0].output_bytes == 720
        await upgraded.apply_events("s1", [out(3, 700, b"z" * 300)])  # 20 fit
        assert await upgraded.read_output("j1", 1, "stdout") == b"x" * 700 + b"z" * 280 + NOTE
    finally:
        await upgraded.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION


@pytest.mark.process
def test_a_capped_job_ends_as_it_did_with_its_output_cut(tmp_path):
    server = Switchboard(tmp_path / "data", extra_args=("--max-run-output", str(CAP)))
    supervisor = start_supervisor(server, tmp_path, name="cap-noop", backend="noop")
    try:
        client = server.client()
        wait_connected(client, "cap-noop")
        before = sample_value(scrape(f"{server.url}/metrics"), "switchboard_output_truncated_total")
        written = "".join(f"line {n:04d}\n" for n in range(500))  # 5000 bytes
        spec = {"name": "chatty", "backend": {"kind": "noop", "exit_code": 3, "output": written}}
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        job = wait_job(client, job_id)
        assert job["phase"] == "failed" and job["exit_code"] == 3  # its own outcome
        assert job["runs"][0]["output_truncated"] == ["stdout"]
        stored = client.get(f"/api/v1/jobs/{job_id}/output").content
        assert stored == written.encode()[:CAP] + NOTE
        followed = client.get(f"/api/v1/jobs/{job_id}/output/follow").content
        assert followed == stored
        after = sample_value(scrape(f"{server.url}/metrics"), "switchboard_output_truncated_total")
        assert after == before + 1
        # Said once in the log, and to the supervisor as an ack problem (docs/protocol.md §6.5).
        assert server.process.log().count("the run reached its output cap") == 1
        problems = sample_value(
            scrape(f"{server.url}/metrics"),
            "switchboard_event_problems_total",
            code="output_capped",
        )
        assert problems >= 1
    finally:
        supervisor.stop()
        server.stop()
