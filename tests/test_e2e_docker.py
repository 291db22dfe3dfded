"""End to end with Docker: real switchboard and supervisor processes and a private engine.
A supervisor SIGKILLed while its containers run is started again: it re-adopts them and
the jobs complete with their whole output and real exit codes. Image artifacts, a
decompression bomb among them, load without the supervisor's memory growing."""

from __future__ import annotations

import contextlib
import gzip
import time
from pathlib import Path

import docker.errors

from tests.docker_engine import (
    BUSYBOX_IMAGE,
    Engine,
    labeled_containers,
    saved_image,
    write_image_with_zeros,
)
from tests.harness import start_supervisor, wait_connected, wait_job, wait_running

_MB = 1024 * 1024


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


def _memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def test_image_artifacts_stream_with_bounded_memory(switchboard, work_dir, docker_engine, tmp_path):
    """A gzipped image artifact of about 1 MB that unpacks to 300 MiB more is refused past
    the configured cap, one that unpacks to 200 MiB more (under it) loads and runs, a
    plain gzipped image loads: and the supervisor's peak memory hardly moves."""
    client = switchboard.client()
    config = tmp_path / "supervisor.toml"
    config.write_text("[docker]\nmax_image_unpacked_mb = 256\n")
    tag = "sb-e2e-image:v1"
    saved = saved_image(docker_engine.api, tag)
    write_image_with_zeros(saved, 300 * _MB, tmp_path / "bomb.tar.gz", tag)
    write_image_with_zeros(saved, 200 * _MB, tmp_path / "big.tar.gz", tag)
    digests = {
        name: client.post("/api/v1/artifacts", content=data).json()["digest"]
        for name, data in [
            ("plain", gzip.compress(saved)),
            ("bomb", (tmp_path / "bomb.tar.gz").read_bytes()),
            ("big", (tmp_path / "big.tar.gz").read_bytes()),
        ]
    }

    def submit(artifact: str, command: list[str]) -> str:
        backend = {"kind": "docker", "image_artifact": digests[artifact], "command": command}
        response = client.post("/api/v1/jobs", json={"name": artifact, "backend": backend})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    sup = start_supervisor(
        switchboard,
        work_dir,
        name="dock-img",
        backend="docker",
        extra_args=("--docker-host", docker_engine.host, "--config", str(config)),
    )
    try:
        wait_connected(client, "dock-img")
        plain = wait_job(client, submit("plain", ["echo", "hi"]))
        assert plain["phase"] == "succeeded", plain
        before = _memory(sup.proc.pid)

        bomb = wait_job(client, submit("bomb", ["true"]), timeout=120)
        after_bomb = _memory(sup.proc.pid)
        assert bomb["phase"] == "rejected", bomb
        [run] = bomb["runs"]
        assert run["error_kind"] == "image_invalid"
        assert "unpacks to more than 256 MB" in run["error"], run

        big = wait_job(client, submit("big", ["wc", "-c", "/zeros"]), timeout=120)
        after_big = _memory(sup.proc.pid)
        assert big["phase"] == "succeeded", big
        out = client.get(f"/api/v1/jobs/{big['id']}/output").content
        assert out == b"%d /zeros\n" % (200 * _MB)
    finally:
        sup.stop()
        for digest in digests.values():
            with contextlib.suppress(docker.errors.ImageNotFound):
                hex_ = digest.removeprefix("sha256:")
                docker_engine.api.remove_image(f"switchboard-artifact:{hex_}-0", force=True)
    figures = {
        "before": before,
        "after the 300 MiB bomb": after_bomb,
        "after the 200 MiB image": after_big,
    }
    print({when: {k: f"{v / _MB:.0f} MiB" for k, v in m.items()} for when, m in figures.items()})
    # The images are 200 and 300 MiB unpacked; streaming keeps the peak within a few MiB.
    assert after_big["VmHWM"] - before["VmHWM"] < 32 * _MB, figures
