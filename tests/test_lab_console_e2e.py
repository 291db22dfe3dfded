"""A device's serial console end to end: a real switchboard, a real supervisor whose config
gives a simulated board (tests/simboard.py, a pseudo-terminal) a console, and the board's
own record of every byte it wrote to it.

While a run holds the board, its console is the run's stream `console:<device>`: stored
byte for byte across ten cuts of the supervisor's connection and a SIGKILL of the
supervisor (what it had spooled to disk before the kill is delivered after its restart;
the board pauses while no supervisor is alive, since nothing could read its tty then).
An operator, or the holder of the lease the board belongs to, attaches to the console
(`switchboard device console`): `ping` gets the board's `pong`; anyone else gets 403.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.faults import FaultyProxy
from tests.harness import (
    Process,
    Switchboard,
    run_cli,
    start_supervisor,
    wait_connected,
    wait_for,
    wait_running,
)
from tests.scrape import sample_value
from tests.simboard import SimBoard

pytestmark = pytest.mark.process

HOST = "console-host"
DEVICE = "board-c"


def _config(board: SimBoard) -> str:
    # Its device node is not its console (a probe's other interface, as on a J-Link): the
    # supervisor reads the console while a run holds the board.
    return f"""[[devices]]
name = "{DEVICE}"
path = "/dev/null"
resource = "simboard"
console = {{ path = "{board.tty}", baud = 115200 }}
"""


@pytest.fixture(scope="module")
def lab(switchboard: Switchboard, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("console-lab")
    board = SimBoard(root / "board")
    proxy = FaultyProxy(switchboard.port)
    lab = Lab(switchboard, root, board, proxy)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


class Lab:
    def __init__(self, switchboard: Switchboard, root: Path, board: SimBoard, proxy: FaultyProxy):
        self.switchboard = switchboard
        self.root = root
        self.board = board
        self.proxy = proxy
        self.config = root / "lab.toml"
        self.config.write_text(_config(board))
        self.client = switchboard.client()
        self.supervisor: Process | None = None

    def start(self) -> None:
        self.supervisor = start_supervisor(
            self.switchboard,
            self.root,
            name=HOST,
            backend="noop",
            url=f"ws://127.0.0.1:{self.proxy.port}",
            extra_args=("--config", str(self.config)),
        )
        wait_connected(self.client, HOST)

    def spool(self, job_id: str) -> Path:
        return self.root / HOST / "console" / f"{job_id}.1" / DEVICE

    def stream(self, job_id: str) -> bytes:
        response = self.client.get(
            f"/api/v1/jobs/{job_id}/output", params={"stream": f"console:{DEVICE}", "attempt": 1}
        )
        assert response.status_code == 200, response.text
        return response.content

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        self.proxy.close()
        self.board.stop()
        self.client.close()


def _chatter(board: SimBoard, seconds: float) -> None:
    board.power("chatter on")
    time.sleep(seconds)
    board.power("chatter off")


def test_the_console_is_the_runs_stream_byte_exact_across_cuts_and_a_kill(lab: Lab) -> None:
    client, board = lab.client, lab.board
    board.power("on")  # its boot log goes to no run: none holds the board yet
    wait_for(lambda: board.written().endswith(b"> "), "the board booted")
    time.sleep(0.3)
    job_id = client.post(
        "/api/v1/jobs",
        json={
            "name": "holds the board",
            "backend": {"kind": "noop", "delay_s": 600},
            "resources": {"simboard": 1},
        },
    ).json()["id"]
    try:
        wait_running(client, job_id)
        _cut_and_kill(lab, job_id)
    finally:
        client.post(f"/api/v1/jobs/{job_id}/cancel")


def _cut_and_kill(lab: Lab, job_id: str) -> None:
    client, board = lab.client, lab.board
    before = len(board.written())

    # Ten cuts of the supervisor's connection while the board keeps talking.
    board.power("chatter on")
    cuts = 0
    while cuts < 10:
        time.sleep(0.25)
        cuts += 1 if lab.proxy.cut() else 0
    time.sleep(0.2)
    board.power("chatter off")
    written = board.written()
    assert written[before:].count(b"tick ") >= 10  # it did talk, through the cuts

    def stored_all() -> bytes | None:
        stream = lab.stream(job_id)
        # Exactly the board's last bytes (the run began at most at `before`)...
        if len(stream) >= len(written) - before and written.endswith(stream):
            return stream
        return None

    stream = wait_for(stored_all, "the console stream stored, byte for byte", timeout=60)
    start = len(written) - len(stream)  # where the run's stream began in the board's record
    assert start <= before
    assert b"tick 000001 \xff\xfe \x1b[1mok\x1b[0m\r\n" in stream  # bytes, not text
    assert lab.proxy.accepted > 10  # it really reconnected after each cut

    # The link stalls: what the board says now is spooled, not delivered. Then the
    # supervisor is killed; restarted, it delivers what it had spooled. (The board pauses
    # while no supervisor is alive: nothing reads its tty then.)
    assert lab.proxy.stall() >= 1
    _chatter(board, 0.5)
    written = board.written()
    wait_for(
        lambda: lab.spool(job_id).stat().st_size == len(written) - start,
        "everything the board said spooled",
    )
    assert len(lab.stream(job_id)) < len(written) - start  # not delivered: the link stalls
    assert lab.supervisor is not None
    lab.supervisor.kill()
    lab.supervisor.stop()
    lab.start()
    final = wait_for(
        lambda: (s := lab.stream(job_id)) == written[start:] and s,
        "the spooled console delivered after the restart",
        timeout=60,
    )
    assert final == written[start:]
    # Acknowledged, the spool is gone; the run did not survive the kill (noop).
    wait_for(lambda: not lab.spool(job_id).exists(), "the delivered spool removed")
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["runs"][0]["phase"] == "lost", job


def test_job_logs_picks_the_console_stream(lab: Lab, switchboard: Switchboard) -> None:
    jobs = lab.client.get("/api/v1/jobs", params={"limit": 50}).json()
    held = next(j for j in jobs["items"] if j["name"] == "holds the board")
    done = run_cli(
        *("-m", "switchboard", "job", "logs", held["id"], "--stream", f"console:{DEVICE}"),
        *("--url", switchboard.url, "--token", switchboard.admin_token),
    )
    assert done.stdout == lab.stream(held["id"]) and b"tick 000001" in done.stdout
    bad = lab.client.get(f"/api/v1/jobs/{held['id']}/output", params={"stream": "console:../etc"})
    assert bad.status_code == 400 and bad.json()["field"] == "stream"


def _ws_url(switchboard: Switchboard) -> str:
    return f"{switchboard.ws_url}/api/v1/devices/{DEVICE}/console"


async def _attach_and_ping(
    switchboard: Switchboard, token: str
) -> tuple[dict, bytes, set[str | None]]:
    async with websockets.connect(
        _ws_url(switchboard), additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        hello = json.loads(await ws.recv())
        await ws.send(b"ping\r")
        seen = b""
        offsets = []
        jobs = set()
        deadline = time.monotonic() + 20
        while b"pong" not in seen:
            message = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
            assert message["type"] == "data", message
            jobs.add(message["job"])
            offsets.append((message["offset"], len(base64.b64decode(message["data"]))))
            seen += base64.b64decode(message["data"])
        # Consecutive pieces continue each other: nothing was lost between them.
        for (offset, size), (next_offset, _) in itertools.pairwise(offsets):
            assert next_offset == offset + size
        return hello, seen, jobs


def test_an_operator_attaches_and_the_board_answers(lab: Lab, switchboard: Switchboard) -> None:
    hello, seen, jobs = asyncio.run(_attach_and_ping(switchboard, switchboard.admin_token))
    assert hello["type"] == "attached" and hello["device"] == DEVICE
    assert hello["supervisor"] == HOST and hello["job"] is None
    assert b"pong\r\n> " in seen
    assert jobs == {None}  # live from the supervisor: no run holds the board


def test_while_a_run_holds_the_board_the_session_shows_its_stream(
    lab: Lab, switchboard: Switchboard
) -> None:
    """The attached session is fed from the run's stored stream: the same bytes, with
    the run's offsets; the answer to what was typed is in the run's stream too."""
    client = lab.client
    job_id = client.post(
        "/api/v1/jobs",
        json={
            "name": "holds the board while attached",
            "backend": {"kind": "noop", "delay_s": 600},
            "resources": {"simboard": 1},
        },
    ).json()["id"]
    try:
        wait_running(client, job_id)
        hello, seen, jobs = asyncio.run(_attach_and_ping(switchboard, switchboard.admin_token))
        assert hello["job"] == f"{job_id}#1" and jobs == {f"{job_id}#1"}
        assert b"pong\r\n" in seen
        wait_for(lambda: b"pong\r\n" in lab.stream(job_id), "the answer in the run's stream")
    finally:
        client.post(f"/api/v1/jobs/{job_id}/cancel")


def test_the_lease_holder_attaches_with_the_cli_and_others_get_403(
    lab: Lab, switchboard: Switchboard
) -> None:
    holder = switchboard.create_token("submitter")
    other = switchboard.create_token("submitter")
    as_holder = httpx.Client(
        base_url=switchboard.url, headers={"Authorization": f"Bearer {holder}"}
    )
    reservation = as_holder.post(
        "/api/v1/reservations", json={"class": "simboard", "count": 1, "for_s": 600}
    ).json()
    wait_for(
        lambda: (
            as_holder.get(f"/api/v1/reservations/{reservation['id']}").json()["state"] == "held"
        ),
        "the board granted to the reservation",
    )
    try:
        refused_before = sample_value(
            httpx.get(f"{switchboard.url}/metrics").text,
            "switchboard_console_refusals_total",
            reason="forbidden",
        )
        # Another submitter holds no lease on the board: 403, counted.
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(_attach_and_ping(switchboard, other))
        assert refused.value.response.status_code == 403
        assert b"holder of its lease" in refused.value.response.body
        refused_after = sample_value(
            httpx.get(f"{switchboard.url}/metrics").text,
            "switchboard_console_refusals_total",
            reason="forbidden",
        )
        assert refused_after == refused_before + 1
        # The holder, through the CLI: what it types goes to the board, the board's answer
        # comes back.
        cli = subprocess.Popen(
            [
                sys.executable,
                *("-m", "switchboard", "device", "console", DEVICE),
                *("--url", switchboard.url, "--token", holder),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = cli.communicate(b"ping\r", timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
        assert cli.returncode == 0, err
        assert b"pong" in out, (out, err)
    finally:
        as_holder.delete(f"/api/v1/reservations/{reservation['id']}")
        as_holder.close()


def test_a_session_ends_when_its_lease_does(lab: Lab, switchboard: Switchboard) -> None:
    """The holder attached by its lease: once the lease is released, the session ends
    within seconds (4403, saying why), counted."""
    holder = switchboard.create_token("submitter")
    as_holder = httpx.Client(
        base_url=switchboard.url, headers={"Authorization": f"Bearer {holder}"}
    )
    reservation = as_holder.post(
        "/api/v1/reservations", json={"class": "simboard", "count": 1, "for_s": 600}
    ).json()
    path = f"/api/v1/reservations/{reservation['id']}"
    wait_for(lambda: as_holder.get(path).json()["state"] == "held", "the board granted")

    async def attached_until_released() -> tuple[int | None, str, list[dict]]:
        async with websockets.connect(
            _ws_url(switchboard), additional_headers={"Authorization": f"Bearer {holder}"}
        ) as ws:
            said = [json.loads(await ws.recv())]
            assert said[0]["type"] == "attached"
            await asyncio.to_thread(as_holder.delete, path)
            try:
                while True:
                    said.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
            except websockets.ConnectionClosed:
                pass
            return ws.close_code, ws.close_reason or "", said

    try:
        code, reason, said = asyncio.run(attached_until_released())
    finally:
        as_holder.delete(path)
        as_holder.close()
    assert code == 4403, (code, reason, said)
    assert said[-1]["type"] == "closed" and "holder of its lease" in said[-1]["reason"]
    ended = sample_value(
        httpx.get(f"{switchboard.url}/metrics").text,
        "switchboard_console_sessions_ended_total",
        reason="revoked",
    )
    assert ended >= 1
