"""A switchboard whose data is restored from an older copy, under a supervisor that stays
up: the supervisor has numbered (and been acknowledged) events the restored store never
saw and cannot send again. The switchboard must notice, reconcile from the supervisor's
status instead of waiting for those events forever, and go on giving it jobs
(docs/protocol.md §6.6)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job, wait_running
from tests.scrape import sample_value, scrape

pytestmark = pytest.mark.process


def submit(client, **backend) -> str:
    response = client.post(
        "/api/v1/jobs", json={"name": "restore", "backend": {"kind": "noop", **backend}}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_restoring_an_older_store_under_a_live_supervisor_recovers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    backup = tmp_path / "backup"
    switchboard = Switchboard(data, extra_args=("--heartbeat-interval", "0.5"))
    supervisor = start_supervisor(switchboard, tmp_path, name="host-r", backend="noop")
    try:
        client = switchboard.client()
        wait_connected(client, "host-r")
        assert wait_job(client, submit(client, output="a\n"))["phase"] == "succeeded"
        # The backup is taken while `long` runs: in it, the run is still running.
        long = submit(client, delay_s=3, output="long\n")
        wait_running(client, long)
        switchboard.stop()
        shutil.copytree(data, backup)

        switchboard.start()
        client = switchboard.client()
        assert wait_job(client, long)["phase"] == "succeeded"
        for _ in range(3):  # more events, acknowledged, that the backup never saw
            assert wait_job(client, submit(client, output="b\n"))["phase"] == "succeeded"
        switchboard.stop()
        shutil.rmtree(data)
        shutil.copytree(backup, data)

        switchboard.start()
        client = switchboard.client()
        wait_connected(client, "host-r")
        # New work flows again: the supervisor is reconciled and takes runs.
        job = wait_job(client, submit(client, output="after restore\n"), timeout=30)
        assert job["phase"] == "succeeded"
        assert client.get(f"/api/v1/jobs/{job['id']}/output").content == b"after restore\n"
        # The run the restored data thought running: the supervisor no longer holds it.
        restored = wait_job(client, long, timeout=30)
        assert restored["phase"] == "lost", restored
        text = scrape(f"{switchboard.url}/metrics")
        assert sample_value(text, "switchboard_seq_resyncs_total") == 1
        # Its next event jumps over what was lost: stored, and named to it on the wire.
        assert sample_value(text, "switchboard_event_problems_total", code="seq_gap") == 1
        log = switchboard.process.log()
        assert log.count("the events in between are lost") == 1, log
        assert supervisor.proc.poll() is None
    finally:
        supervisor.stop()
        switchboard.stop()
