"""End to end with Docker: real switchboard and supervisor processes and a private engine.
A supervisor SIGKILLed while its containers run is started again: it re-adopts them and
the jobs complete with their whole output and real exit codes."""

from __future__ import annotations

import time

from tests.docker_engine import BUSYBOX_IMAGE, Engine, labeled_containers
from tests.harness import start_supervisor, wait_connected, wait_job, wait_running


def _docker_supervisor(switchboard, work_dir, engine: Engine):
    return start_supervisor(
        switchboard,
        work_dir,
        name="dock-1",
        backend="docker",
        max_jobs=4,
        extra_args=("--docker-host", engine.host),
    )


def _submit(client, script: str) -> str:
    spec = {
        "name": "sh",
        "backend": {"kind": "docker", "image": BUSYBOX_IMAGE, "command": ["sh", "-c", script]},
    }
    response = client.post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_docker_job_exit_code_and_streams(switchboard, work_dir, docker_engine):
    client = switchboard.client()
    sup = _docker_supervisor(switchboard, work_dir, docker_engine)
    try:
        wait_connected(client, "dock-1")
        job = wait_job(client, _submit(client, "echo out; printf 'e\\377' >&2; exit 5"))
        assert job["phase"] == "failed" and job["exit_code"] == 5
        out = client.get(f"/api/v1/jobs/{job['id']}/output", params={"stream": "stdout"})
        err = client.get(f"/api/v1/jobs/{job['id']}/output", params={"stream": "stderr"})
        assert (out.content, err.content) == (b"out\n", b"e\xff")
    finally:
        sup.stop()


def test_supervisor_sigkill_and_restart_readopts_containers(switchboard, work_dir, docker_engine):
    client = switchboard.client()
    sup = _docker_supervisor(switchboard, work_dir, docker_engine)
    script = "i=0; while [ $i -lt {n} ]; do echo line $i; i=$((i+1)); sleep 0.1; done; exit {code}"
    try:
        wait_connected(client, "dock-1")
        jobs = {
            _submit(client, script.format(n=40, code=3)): (40, 3),  # outlives the outage
            _submit(client, script.format(n=10, code=0)): (10, 0),  # ends during it
        }
        for job_id in jobs:
            wait_running(client, job_id)
        time.sleep(0.3)
        sup.kill()
        time.sleep(1.5)  # the short job finishes while no supervisor watches
        sup = _docker_supervisor(switchboard, work_dir, docker_engine)
        for job_id, (lines, code) in jobs.items():
            job = wait_job(client, job_id, timeout=60)
            assert job["exit_code"] == code, job
            assert job["phase"] == ("succeeded" if code == 0 else "failed")
            assert len(job["runs"]) == 1
            out = client.get(f"/api/v1/jobs/{job_id}/output").content
            assert out == b"".join(b"line %d\n" % i for i in range(lines))
    finally:
        sup.stop()
    deadline = time.monotonic() + 15
    while labeled_containers(docker_engine.api, "switchboard.supervisor=dock-1"):
        assert time.monotonic() < deadline, "containers left behind"
        time.sleep(0.1)
