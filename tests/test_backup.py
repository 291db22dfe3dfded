"""`switchboard db backup`: a copy of a data dir made while the switchboard serves it and
jobs keep coming (real processes, on-disk SQLite) is a data dir another switchboard
serves, with the jobs, their output and the artifacts the copy's database names; a second
backup into the same place copies only what is new; the secret key is not copied."""

from __future__ import annotations

import hashlib
import threading

import pytest

from tests.harness import Switchboard, run_cli, start_supervisor, wait_connected, wait_job

pytestmark = pytest.mark.process


def test_a_backup_made_while_serving_is_served(tmp_path):
    data = tmp_path / "data"
    server = Switchboard(data)
    sup = start_supervisor(server, tmp_path, name="bk-1", backend="noop")
    copy = tmp_path / "copy"
    try:
        client = server.client()
        wait_connected(client, "bk-1")
        blob = b"an artifact to keep\n" * 100
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        assert client.post("/api/v1/artifacts", content=blob).status_code == 201
        spec = {"name": "kept", "backend": {"kind": "noop", "output": "in the backup\n"}}
        kept = wait_job(client, client.post("/api/v1/jobs", json=spec).json()["id"])
        assert kept["phase"] == "succeeded"

        # Jobs keep coming while the backup is made: it must neither block nor break them.
        stop = threading.Event()
        submitted: list[str] = []

        def submit() -> None:
            with server.client() as busy:
                while not stop.is_set():
                    job = {"name": "meanwhile", "backend": {"kind": "noop"}}
                    submitted.append(busy.post("/api/v1/jobs", json=job).json()["id"])

        feeder = threading.Thread(target=submit)
        feeder.start()
        try:
            args = ("-m", "switchboard", "db", "backup", "--data-dir", str(data))
            done = run_cli(*args, "--to", str(copy))
        finally:
            stop.set()
            feeder.join()
        said = done.stdout.decode()
        # Ours, and the artifact of no bytes every switchboard holds.
        assert "artifacts: 2 copied, 0 already there" in said, said
        assert "not copied: the secret key" in said
        assert submitted and all(
            wait_job(client, j)["phase"] == "succeeded" for j in submitted[-5:]
        )
        again = run_cli(*args, "--to", str(copy)).stdout.decode()
        assert "artifacts: 0 copied, 2 already there" in again, again
        assert not list(copy.glob("*.key")) and not (tmp_path / "copy.key").exists()
        refused = run_cli(*args, "--to", str(data), check=False)
        assert refused.returncode != 0 and "the data dir itself" in refused.stderr.decode()
    finally:
        sup.stop()
        server.stop()

    restored = Switchboard(copy, extra_args=("--secret-key-file", str(tmp_path / "data.key")))
    try:
        client = restored.client()
        job = client.get(f"/api/v1/jobs/{kept['id']}").json()
        assert job["phase"] == "succeeded", job
        assert client.get(f"/api/v1/jobs/{kept['id']}/output").content == b"in the backup\n"
        assert client.get(f"/api/v1/artifacts/{digest}").content == blob
    finally:
        restored.stop()
