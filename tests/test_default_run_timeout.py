"""A job whose spec gives no run timeout gets the switchboard's default when it is
submitted: a job that spins (here a noop that would wait a minute) is timed out on a real
supervisor instead of holding its slot until someone cancels it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Switchboard, run_cli, start_supervisor, wait_connected, wait_job

pytestmark = pytest.mark.process

DEFAULT_S = 1.0


@pytest.fixture(scope="module")
def short_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switchboard]:
    server = Switchboard(
        tmp_path_factory.mktemp("default-timeout") / "data",
        extra_args=("--default-run-timeout", str(DEFAULT_S)),
    )
    yield server
    server.stop()


def test_a_job_without_a_timeout_is_timed_out_after_the_default(short_default, work_dir: Path):
    supervisor = start_supervisor(short_default, work_dir, name="spinner", backend="noop")
    try:
        client = short_default.client()
        wait_connected(client, "spinner")
        spec = {"name": "spins", "backend": {"kind": "noop", "delay_s": 600}}
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        # The default is part of the stored spec: the job shows the limit it runs under.
        assert client.get(f"/api/v1/jobs/{job_id}").json()["spec"]["timeout_s"] == DEFAULT_S
        job = wait_job(client, job_id, timeout=60)
        assert job["phase"] == "timed_out", job
        [run] = job["runs"]
        assert run["supervisor_id"] == "spinner"
        # A spec's own timeout wins over the default.
        own = {**spec, "timeout_s": 300}
        job_id = client.post("/api/v1/jobs", json=own).json()["id"]
        assert client.get(f"/api/v1/jobs/{job_id}").json()["spec"]["timeout_s"] == 300
        client.post(f"/api/v1/jobs/{job_id}/cancel")
        assert wait_job(client, job_id)["phase"] == "canceled"
    finally:
        supervisor.stop()


def test_the_default_can_be_turned_off(tmp_path: Path):
    server = Switchboard(tmp_path / "data", extra_args=("--default-run-timeout", "0"))
    try:
        client = server.client()
        spec = {"name": "unbounded", "backend": {"kind": "noop"}}
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        assert "timeout_s" not in client.get(f"/api/v1/jobs/{job_id}").json()["spec"]
    finally:
        server.stop()


@pytest.mark.parametrize("value", ["-1", "604801", "nan", "an hour"])
def test_a_bad_default_is_refused_at_start(tmp_path: Path, value: str):
    done = run_cli(
        "-m",
        "switchboard",
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--default-run-timeout",
        value,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"--default-run-timeout" in done.stderr
