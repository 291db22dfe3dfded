"""Heartbeats over real sockets: a silent peer is cut off; a supervisor busy running a guest
that spins keeps its connection and keeps sending output."""

from __future__ import annotations

import asyncio
import time

import pytest

from protocol.exceptions import CloseCode
from tests.harness import Switchboard, start_supervisor, wait_connected, wait_job
from tests.supervisor_ws import closed_with, connect_ws, handshake
from tests.wasi import SLEEPER, SPIN, compile_c

pytestmark = pytest.mark.wasm

INTERVAL, TIMEOUT = 0.2, 1.0


@pytest.fixture(scope="module")
def switchboard(tmp_path_factory):
    server = Switchboard(
        tmp_path_factory.mktemp("hb") / "data",
        extra_args=("--heartbeat-interval", str(INTERVAL), "--heartbeat-timeout", str(TIMEOUT)),
    )
    yield server
    server.stop()


async def test_silent_supervisor_is_cut_off(switchboard):
    token = switchboard.create_token("supervisor")
    async with connect_ws(switchboard, token) as ws:
        welcome = await handshake(ws, "silent")
        assert welcome.heartbeat_interval_s == INTERVAL
        started = time.monotonic()
        code, reason, frames = await asyncio.wait_for(closed_with(ws), 10)
        waited = time.monotonic() - started
    assert code == CloseCode.HEARTBEAT_TIMEOUT and "heartbeat" in reason
    assert TIMEOUT <= waited < TIMEOUT + 5
    assert any(f["type"] == "heartbeat" for f in frames)  # the switchboard sent its own
    sups = {s["id"]: s for s in switchboard.client().get("/api/v1/supervisors").json()}
    assert not sups["silent"]["connected"]


def test_spinning_guests_do_not_starve_the_connection(switchboard, work_dir, tmp_path):
    client = switchboard.client()
    spin = compile_c(SPIN, tmp_path, "spin").read_bytes()
    sleeper = compile_c(SLEEPER, tmp_path, "sleeper").read_bytes()
    digests = [
        client.post("/api/v1/artifacts", content=m).json()["digest"] for m in (spin, sleeper)
    ]
    sup = start_supervisor(switchboard, work_dir, name="busy", backend="wasm", max_jobs=3)
    try:
        wait_connected(client, "busy")
        session = _session(client, "busy")
        # Two guests spin on both cores while a third prints a tick every 100 ms.
        spinners = [
            client.post(
                "/api/v1/jobs",
                json={
                    "name": "spin",
                    "backend": {"kind": "wasm", "module": digests[0]},
                    "timeout_s": 4 * TIMEOUT,
                },
            ).json()["id"]
            for _ in range(2)
        ]
        ticker = client.post(
            "/api/v1/jobs",
            json={
                "name": "ticks",
                "backend": {"kind": "wasm", "module": digests[1], "args": ["100", "20"]},
            },
        ).json()["id"]
        job = wait_job(client, ticker, timeout=60)
        assert job["phase"] == "succeeded"
        out = client.get(f"/api/v1/jobs/{ticker}/output").content
        assert out == b"".join(b"tick %d\n" % i for i in range(20))
        for spinner in spinners:
            assert wait_job(client, spinner, timeout=60)["phase"] == "timed_out"
        # Output arrived while the spinners ran, and the connection never dropped.
        [run] = job["runs"]
        spin_end = min(wait_job(client, s)["runs"][0]["ended_at"] for s in spinners)
        assert run["ended_at"] < spin_end
        assert _session(client, "busy") == session
    finally:
        sup.stop()


def _session(client, supervisor_id: str) -> int:
    for sup in client.get("/api/v1/supervisors").json():
        if sup["id"] == supervisor_id:
            assert sup["connected"]
            return sup["session"]
    raise AssertionError(f"no supervisor {supervisor_id}")
