"""A device's serial console across a supervisor restart that keeps the run: a Docker run
holds a simulated board (tests/simboard.py) whose console its supervisor reads; the
supervisor is killed (SIGKILL) with console output spooled but not delivered, and
restarted: it re-adopts the container, sends the spool again from offset 0 (the
switchboard keeps what it lacks) and goes on capturing into the same run's stream, which
ends byte for byte what the board wrote. The board pauses while no supervisor is alive:
nothing reads its tty then."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.docker_engine import BUSYBOX_IMAGE, Engine
from tests.faults import FaultyProxy
from tests.harness import (
    Process,
    Switchboard,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_running,
)
from tests.simboard import SimBoard

pytestmark = pytest.mark.docker

HOST = "console-docker-host"
DEVICE = "board-d"


def test_a_re_adopted_run_keeps_its_console_stream_byte_exact(
    switchboard: Switchboard, docker_engine: Engine, tmp_path: Path
) -> None:
    board = SimBoard(tmp_path / "board")
    proxy = FaultyProxy(switchboard.port)
    config = tmp_path / "lab.toml"
    # The run gets /dev/null as its device node; the board's console is apart from it.
    config.write_text(
        f"""[[devices]]
name = "{DEVICE}"
path = "/dev/null"
container_path = "/dev/probe"
resource = "simboard"
console = {{ path = "{board.tty}", baud = 115200 }}
"""
    )
    client = switchboard.client()
    supervisor: Process | None = None

    def start() -> Process:
        started = start_supervisor(
            switchboard,
            tmp_path,
            name=HOST,
            backend="docker",
            url=f"ws://127.0.0.1:{proxy.port}",
            extra_args=("--config", str(config), "--docker-host", docker_engine.host),
        )
        wait_connected(client, HOST)
        return started

    def stream(job_id: str) -> bytes:
        return client.get(
            f"/api/v1/jobs/{job_id}/output", params={"stream": f"console:{DEVICE}", "attempt": 1}
        ).content

    def chatter(seconds: float) -> bytes:
        board.power("chatter on")
        time.sleep(seconds)
        board.power("chatter off")
        return board.written()

    job_id = ""
    try:
        supervisor = start()
        board.power("on")
        wait_for(lambda: board.written().endswith(b"> "), "the board booted")
        time.sleep(0.3)  # its boot log read: no run's
        before = len(board.written())
        job_id = client.post(
            "/api/v1/jobs",
            json={
                "name": "docker holds the board",
                "backend": {"kind": "docker", "image": BUSYBOX_IMAGE, "command": ["sleep", "600"]},
                "resources": {"simboard": 1},
            },
        ).json()["id"]
        wait_running(client, job_id, timeout=60)
        written = chatter(0.3)
        wait_for(
            lambda: len(s := stream(job_id)) >= len(written) - before and written.endswith(s),
            "the console stream stored",
        )
        start_at = len(written) - len(stream(job_id))  # where the run's stream began
        assert start_at <= before

        proxy.stall()  # nothing more is delivered: it is spooled
        written = chatter(0.3)
        spool = tmp_path / HOST / "console" / f"{job_id}.1" / DEVICE
        wait_for(lambda: spool.stat().st_size == len(written) - start_at, "spooled")
        supervisor.kill()
        supervisor.stop()
        supervisor = start()  # re-adopts the container: the run goes on
        wait_for(lambda: stream(job_id) == written[start_at:], "the spool delivered", timeout=60)
        written = chatter(0.3)  # captured by the new process, into the same stream
        wait_for(lambda: stream(job_id) == written[start_at:], "the stream continued")
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        assert job["phase"] == "running" and len(job["runs"]) == 1, job
    finally:
        if job_id:
            client.post(f"/api/v1/jobs/{job_id}/cancel")
        if supervisor is not None:
            supervisor.stop()
        proxy.close()
        board.stop()
        client.close()
