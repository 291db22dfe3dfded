"""A supervisor given several switchboard addresses (replicas of one lab) uses one and turns
to the next when it fails: real processes. The switchboard it is connected to is killed
while a job runs; another switchboard process comes up on the same data dir (a replica of
the same lab) at the next address: the supervisor reconnects there, the run is adopted
(not lost, not run twice) and ends with its output whole, and a job placed afterwards
fetches its input artifact from the replica now in use, the dead one being gone."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest

from tests.harness import (
    Switchboard,
    run_cli,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_job,
    wait_running,
)
from tests.scrape import sample_value, scrape

pytestmark = pytest.mark.process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_supervisor_fails_over_to_the_next_address(tmp_path):
    data = tmp_path / "data"
    first = Switchboard(data)
    replica_port = free_port()
    replica_url = f"ws://127.0.0.1:{replica_port}"
    sup = start_supervisor(
        first,
        tmp_path,
        name="fo-1",
        backend="noop",
        extra_args=("--switchboard", replica_url, "--metrics-port", "0"),
    )
    replica: Switchboard | None = None
    try:
        client = first.client()
        wait_connected(client, "fo-1")
        spec = {
            "name": "spans-the-failover",
            "backend": {"kind": "noop", "delay_s": 3, "output": "before and after\n"},
        }
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        wait_running(client, job_id)
        first.process.kill()
        killed = time.monotonic()
        replica = Switchboard(data, port=replica_port)
        client = replica.client()
        wait_connected(client, "fo-1", timeout=30)
        took = time.monotonic() - killed
        job = wait_job(client, job_id, timeout=60)
        assert job["phase"] == "succeeded", (job, sup.log())
        assert [r["attempt"] for r in job["runs"]] == [1], job  # adopted, not run again
        output = client.get(f"/api/v1/jobs/{job_id}/output").content
        assert output == b"before and after\n"
        assert f"trying {replica_url}/ws/supervisor" in sup.log()

        # REST calls follow the WebSocket: the input comes from the replica.
        data_bytes = b"an input after the failover\n"
        digest = "sha256:" + hashlib.sha256(data_bytes).hexdigest()
        assert client.post("/api/v1/artifacts", content=data_bytes).status_code == 201
        spec = {"name": "after", "backend": {"kind": "noop"}, "inputs": {"d.txt": digest}}
        after = wait_job(client, client.post("/api/v1/jobs", json=spec).json()["id"])
        assert after["phase"] == "succeeded", (after, sup.log())
        port = int(wait_for(lambda: _metrics_port(sup.log()), "the metrics port logged"))
        exposition = scrape(f"http://127.0.0.1:{port}/metrics")
        assert sample_value(exposition, "supervisor_failovers_total") >= 1
        print(f"connected to the replica {took:.2f} s after the kill")
    finally:
        sup.stop()
        if replica is not None:
            replica.stop()
        first.stop()


def _metrics_port(log: str) -> int | None:
    for line in log.splitlines():
        if "metrics on http://" in line:
            return int(line.split("metrics on http://", 1)[1].split(":")[1].split("/")[0])
    return None


def test_several_addresses_must_agree_on_tls(tmp_path):
    done = run_cli(
        "-m",
        "supervisor",
        "run",
        "--switchboard",
        "ws://127.0.0.1:1",
        "--switchboard",
        "wss://127.0.0.1:2",
        "--token",
        "x",
        check=False,
    )
    assert done.returncode != 0
    assert "mix ws and wss" in done.stderr.decode()
