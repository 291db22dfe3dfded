"""The switchboard asks each connected supervisor for its runs every few heartbeats
(StatusRequest) and repairs what drifted, as on a reconnect: a real switchboard process,
and a supervisor played over a real WebSocket (as a third-party one would be), so the
drift can be made on purpose."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from protocol import codec
from protocol.messages import (
    Ack,
    Heartbeat,
    HeldRun,
    Hello,
    JobStateChanged,
    StartJob,
    StatusReply,
    StatusRequest,
    StopJob,
    Welcome,
)
from protocol.state import Phase
from protocol.versions import supported_versions
from tests.harness import Switchboard, scaled
from tests.scrape import sample_value
from tests.supervisor_ws import connect_ws

EVERY = 2  # heartbeats between two StatusRequests
INTERVAL = 0.2


@pytest.fixture
def switchboard(tmp_path):
    server = Switchboard(
        tmp_path / "data",
        extra_args=("--heartbeat-interval", str(INTERVAL), "--status-every", str(EVERY)),
    )
    yield server
    server.stop()


async def _next(ws, kind: type[msgspec.Struct]):
    """The next message of `kind` from the switchboard (others skipped); a heartbeat goes
    back now and then, so the supervisor played here stays alive."""
    async with asyncio.timeout(scaled(20)):
        while True:
            message = codec.decode_from_switchboard(await ws.recv(decode=False))
            if isinstance(message, kind):
                return message
            await ws.send(codec.encode(Heartbeat(at=time.time())), text=True)


async def _first_run_ends(client, job_id: str) -> dict:
    """The job once its first run has ended (polled: another process's store)."""
    for _ in range(int(scaled(10) / 0.05)):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["runs"][0]["phase"] in {"lost", "succeeded", "failed", "canceled"}:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"the first run of {job_id} did not end: {job}")


def _metric(switchboard: Switchboard, name: str, **labels: str) -> float:
    text = switchboard.client().get("/metrics").text
    return sample_value(text, name, **labels)


async def test_a_status_reply_repairs_drift_as_a_reconnect_would(switchboard):
    client = switchboard.client()
    token = switchboard.create_token("supervisor", "drifty")
    lost_before = _metric(switchboard, "switchboard_runs_lost_total", via="status")
    stopped_before = _metric(switchboard, "switchboard_zombie_runs_stopped_total", via="status")
    async with connect_ws(switchboard, token) as ws:
        hello = Hello(
            supervisor_id="drifty",
            name="drifty",
            versions=supported_versions(),
            backends=["noop"],
            labels={"pool": "drift"},
            max_jobs=2,
        )
        await ws.send(codec.encode(hello), text=True)
        assert isinstance(codec.decode_from_switchboard(await ws.recv(decode=False)), Welcome)
        job_id = client.post(
            "/api/v1/jobs",
            json={
                "name": "forgotten",
                "backend": {"kind": "noop", "delay_s": 600},
                "selector": {"match_labels": {"pool": "drift"}},
            },
        ).json()["id"]
        start = await _next(ws, StartJob)
        assert (start.job_id, start.attempt) == (job_id, 1)
        running = JobStateChanged(seq=1, job_id=job_id, attempt=1, phase=Phase.RUNNING)
        await ws.send(codec.encode(running), text=True)
        assert (await _next(ws, Ack)).seq == 1

        # The supervisor lost the run without a word: the next answer no longer lists it.
        request = await _next(ws, StatusRequest)
        await ws.send(codec.encode(StatusReply(request_id=request.request_id)), text=True)
        job = await _first_run_ends(client, job_id)
        assert job["runs"][0]["phase"] == "lost"
        assert job["runs"][0]["message"] == "supervisor no longer holds it"

        # It holds a run the switchboard never gave it (or gave up on): stopped.
        request = await _next(ws, StatusRequest)
        ghost = HeldRun("ghost", 1, Phase.RUNNING)
        reply = StatusReply(request_id=request.request_id, runs=[ghost], running=1)
        await ws.send(codec.encode(reply), text=True)
        stop = await _next(ws, StopJob)
        assert (stop.job_id, stop.attempt, stop.reason) == ("ghost", 1, "unwanted")

    assert _metric(switchboard, "switchboard_runs_lost_total", via="status") == lost_before + 1
    assert (
        _metric(switchboard, "switchboard_zombie_runs_stopped_total", via="status")
        == stopped_before + 1
    )


async def test_requests_come_every_few_heartbeats(switchboard):
    """The cadence: about EVERY heartbeat intervals apart (measured against the floor the
    setting gives, with a generous ceiling for a loaded machine)."""
    token = switchboard.create_token("supervisor", "steady")
    async with connect_ws(switchboard, token) as ws:
        hello = Hello(
            supervisor_id="steady", name="steady", versions=supported_versions(), backends=["noop"]
        )
        await ws.send(codec.encode(hello), text=True)
        assert isinstance(codec.decode_from_switchboard(await ws.recv(decode=False)), Welcome)
        await _next(ws, StatusRequest)
        first = time.monotonic()
        await _next(ws, StatusRequest)
        gap = time.monotonic() - first
        assert gap >= EVERY * INTERVAL * 0.8
        assert gap < scaled(EVERY * INTERVAL * 10)
