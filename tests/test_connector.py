"""WebSocketConnector against a real switchboard process."""

from __future__ import annotations

import asyncio

import pytest

from connector.websocket import ConnectorFatalError, WebSocketConnector
from protocol import codec
from protocol.messages import Ack, Hello, JobStateChanged, RunRef, StartJob
from protocol.state import Phase
from supervisor.backends.noop import NoopBackend
from supervisor.jobs import BackendSupervisor
from tests.supervisor_ws import connect_ws, handshake


def _connector(switchboard, token, supervisor_id, tmp_path) -> WebSocketConnector:
    supervisor = BackendSupervisor(NoopBackend(), work_dir=tmp_path)
    return WebSocketConnector(
        supervisor, f"{switchboard.ws_url}/ws/supervisor", token, supervisor_id=supervisor_id
    )


async def test_wrong_token_stops_the_connector_instead_of_retrying(switchboard, tmp_path):
    connector = _connector(switchboard, "sbt_not-a-token", "refused", tmp_path)
    with pytest.raises(ConnectorFatalError, match="401"):
        await asyncio.wait_for(connector.run(), 10)


async def test_events_before_the_first_welcome_continue_the_stored_numbering(switchboard, tmp_path):
    token = switchboard.create_token("supervisor", "reborn")
    # An earlier life of this supervisor got events 1..3 stored.
    async with connect_ws(switchboard, token) as ws:
        await handshake(ws, "reborn")
        for seq in (1, 2, 3):
            event = JobStateChanged(seq=seq, job_id="gone", attempt=1, phase=Phase.RUNNING)
            await ws.send(codec.encode(event), text=True)
        acked = 0
        while acked < 3:
            message = codec.decode_from_switchboard(await ws.recv(decode=False))
            if isinstance(message, Ack):
                acked = message.seq
    # A fresh process reports before it has connected (as a recovered run would).
    connector = _connector(switchboard, token, "reborn", tmp_path)
    await connector.update_job_state(RunRef("gone", 1), Phase.RUNNING)
    running = asyncio.create_task(connector.run())
    try:
        await asyncio.wait_for(connector.connected.wait(), 10)
        for _ in range(200):
            if len(connector.backlog) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(connector.backlog) == 0  # acknowledged, so stored: not mistaken for 1..3
        assert connector.backlog.last_seq == 4
    finally:
        connector.stop()
        await asyncio.wait_for(running, 10)


@pytest.mark.unit
async def test_retry_after_hint_delays_the_reconnect(tmp_path):
    """A switchboard that closes with a retry-after hint is not called again sooner."""
    import time

    import websockets

    from protocol import limits
    from protocol.exceptions import CloseCode
    from protocol.messages import ProtocolErrorMessage, Welcome

    attempts: list[float] = []

    async def switchboard(ws) -> None:
        attempts.append(time.monotonic())
        await ws.recv()
        await ws.send(
            codec.encode(Welcome(version="1.0", session=len(attempts), last_seq=0)), text=True
        )
        bye = ProtocolErrorMessage(
            code=int(CloseCode.TRY_AGAIN_LATER), reason="restarting", retry_after_s=0.8
        )
        await ws.send(codec.encode(bye), text=True)
        await ws.close(CloseCode.TRY_AGAIN_LATER, "restarting")

    server = await websockets.serve(
        switchboard, "127.0.0.1", 0, subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)]
    )
    port = server.sockets[0].getsockname()[1]
    supervisor = BackendSupervisor(NoopBackend(), work_dir=tmp_path)
    connector = WebSocketConnector(
        supervisor, f"ws://127.0.0.1:{port}/ws/supervisor", "sbt_x", supervisor_id="hinted"
    )
    running = asyncio.create_task(connector.run())
    try:
        for _ in range(100):
            if len(attempts) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        connector.stop()
        await asyncio.wait_for(running, 10)
        server.close()
    assert len(attempts) >= 2
    assert attempts[1] - attempts[0] >= 0.8


async def test_a_run_that_ended_while_the_supervisor_was_down_is_not_taken_for_lost(
    switchboard, tmp_path
):
    """A restarted supervisor re-adopts a run that has ended meanwhile: its reports wait for
    the first Welcome, and the Hello must still name the run, or reconciliation would
    finalize it as lost (and its restart policy would run the program again)."""
    token = switchboard.create_token("supervisor", "reborn-2")
    client = switchboard.client()
    async with connect_ws(switchboard, token) as ws:  # the earlier life: the run starts
        hello = Hello(
            supervisor_id="reborn-2",
            name="reborn-2",
            versions=["1.0"],
            backends=["noop"],
            labels={"only": "reborn-2"},
        )
        await ws.send(codec.encode(hello), text=True)
        await ws.recv(decode=False)  # welcome
        job_id = client.post(
            "/api/v1/jobs",
            json={
                "name": "x",
                "backend": {"kind": "noop"},
                "restart": {"policy": "on_failure", "max_restarts": 1},
            },
        ).json()["id"]
        while not isinstance(codec.decode_from_switchboard(await ws.recv(decode=False)), StartJob):
            pass
        running = JobStateChanged(seq=1, job_id=job_id, attempt=1, phase=Phase.RUNNING)
        await ws.send(codec.encode(running), text=True)
        while True:
            message = codec.decode_from_switchboard(await ws.recv(decode=False))
            if isinstance(message, Ack) and message.seq >= 1:
                break
    # The new process: the re-adopted run reports its end before any connection.
    connector = _connector(switchboard, token, "reborn-2", tmp_path)
    run = RunRef(job_id, 1)
    await connector.send_output(run, "stdout", 0, b"ok")
    await connector.report_exit(run, exit_code=0)
    await connector.update_job_state(run, Phase.SUCCEEDED)
    task = asyncio.create_task(connector.run())
    try:
        await asyncio.wait_for(connector.connected.wait(), 10)
        for _ in range(100):
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            if job["phase"] not in ("running", "queued", "assigned"):
                break
            await asyncio.sleep(0.05)
        assert [(r["attempt"], r["phase"]) for r in job["runs"]] == [(1, "succeeded")]
        assert client.get(f"/api/v1/jobs/{job_id}/output").content == b"ok"
    finally:
        connector.stop()
        await asyncio.wait_for(task, 10)


@pytest.mark.unit
async def test_only_a_window_of_the_backlog_travels_unacknowledged(tmp_path):
    """Output piles up in the backlog while the switchboard is slow to acknowledge, but only
    `send_window_bytes` of it is on the wire at once (so a follower's lag stays small); each
    Ack lets more go, and everything arrives once, in order."""
    import websockets

    from protocol import limits
    from protocol.messages import Output, Welcome

    chunk = 256 * 1024
    received: list[int] = []
    release = asyncio.Event()

    async def slow_switchboard(ws) -> None:
        await ws.recv()
        await ws.send(codec.encode(Welcome(version="1.0", session=1, last_seq=0)), text=True)

        async def acknowledge_when_released() -> None:
            await release.wait()
            await ws.send(codec.encode(Ack(seq=received[-1])), text=True)

        acknowledging = asyncio.create_task(acknowledge_when_released())
        try:
            async for raw in ws:
                message = codec.decode_from_supervisor(raw)
                if isinstance(message, Output):
                    received.append(message.seq)
                    if acknowledging.done():
                        await ws.send(codec.encode(Ack(seq=message.seq)), text=True)
        finally:
            acknowledging.cancel()

    server = await websockets.serve(
        slow_switchboard,
        "127.0.0.1",
        0,
        subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
        max_size=2 * 1024 * 1024,
    )
    port = server.sockets[0].getsockname()[1]
    supervisor = BackendSupervisor(NoopBackend(), work_dir=tmp_path)
    connector = WebSocketConnector(
        supervisor,
        f"ws://127.0.0.1:{port}/ws/supervisor",
        "sbt_x",
        supervisor_id="windowed",
        send_window_bytes=4 * chunk,
    )
    running = asyncio.create_task(connector.run())
    try:
        await asyncio.wait_for(connector.connected.wait(), 10)
        for n in range(16):
            await connector.send_output(RunRef("j", 1), "stdout", n * chunk, b"x" * chunk)
        await asyncio.sleep(0.5)  # time enough to send everything, were it allowed
        assert 1 <= len(received) <= 4, received  # the window (frames are a bit over a chunk)
        assert len(connector.backlog) == 16  # the rest waits in the backlog, not lost
        release.set()  # what arrived is acknowledged, then each arrival at once
        for _ in range(200):
            if len(received) == 16:
                break
            await asyncio.sleep(0.02)
        assert received == list(range(1, 17))
    finally:
        connector.stop()
        await asyncio.wait_for(running, 10)
        server.close()


async def _recording_switchboard(received: list[tuple[float, object]]):
    """A switchboard that welcomes, records each event with when it came, and acks it."""
    import websockets

    from protocol import limits
    from protocol.messages import Welcome

    async def record(ws) -> None:
        await ws.recv()
        await ws.send(codec.encode(Welcome(version="1.0", session=1, last_seq=0)), text=True)
        async for raw in ws:
            message = codec.decode_from_supervisor(raw)
            received.append((asyncio.get_running_loop().time(), message))
            if message.seq:
                await ws.send(codec.encode(Ack(seq=message.seq)), text=True)

    return await websockets.serve(
        record, "127.0.0.1", 0, subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)]
    )


@pytest.mark.unit
async def test_a_runs_progress_goes_out_with_its_end_or_after_the_linger(tmp_path, monkeypatch):
    """A phase that is not a run's last waits (at most PROGRESS_LINGER_S) for company: a
    short run's progress travels with its end, which goes at once; progress alone still
    goes, once the linger is over."""
    from connector import websocket as connector_module
    from protocol.messages import JobExit

    linger_s = 0.3  # long enough that the yields below never outlast it
    monkeypatch.setattr(connector_module, "PROGRESS_LINGER_S", linger_s)
    received: list[tuple[float, object]] = []
    server = await _recording_switchboard(received)
    port = server.sockets[0].getsockname()[1]
    supervisor = BackendSupervisor(NoopBackend(), work_dir=tmp_path)
    connector = WebSocketConnector(
        supervisor, f"ws://127.0.0.1:{port}/ws/supervisor", "sbt_x", supervisor_id="lingering"
    )
    loop = asyncio.get_running_loop()
    running = asyncio.create_task(connector.run())
    try:
        await asyncio.wait_for(connector.connected.wait(), 10)
        run = RunRef("short", 1)
        await connector.update_job_state(run, Phase.INITIALIZING, stage="accepted")
        await connector.update_job_state(run, Phase.RUNNING)
        for _ in range(20):  # the writer gets its turns: without the linger, it would send
            await asyncio.sleep(0)
        assert received == []
        ended_at = loop.time()
        await connector.report_exit(run, exit_code=0)
        await connector.update_job_state(run, Phase.SUCCEEDED)
        await asyncio.wait_for(connector.delivered(), 10)
        assert [type(m).__name__ for _, m in received] == [
            "JobStateChanged",
            "JobStateChanged",
            "JobExit",
            "JobStateChanged",
        ]
        assert isinstance(received[2][1], JobExit)
        # All came with the end, well before the linger would have let the first go.
        assert all(at - ended_at < linger_s for at, _ in received)

        received.clear()
        alone_at = loop.time()
        await connector.update_job_state(RunRef("long", 1), Phase.RUNNING)
        await asyncio.wait_for(connector.delivered(), 10)
        [(arrived, message)] = received
        assert isinstance(message, JobStateChanged) and message.phase == Phase.RUNNING
        assert arrived - alone_at >= linger_s * 0.9  # held for company, then sent alone
    finally:
        connector.stop()
        await asyncio.wait_for(running, 10)
        server.close()
