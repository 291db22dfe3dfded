"""The same StartJob delivered twice (its acknowledgement lost in a cut): the program runs
once. The switchboard side here is a scripted WebSocket server speaking the real protocol,
so the test controls exactly when the link is cut and what is resent."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import websockets

from connector.websocket import WebSocketConnector
from protocol import codec, limits
from protocol.messages import Ack, Event, Hello, JobExit, Output, StartJob, Welcome
from protocol.spec import NoopBackend as NoopSpec
from supervisor.backends.noop import NoopBackend
from supervisor.jobs import BackendSupervisor

pytestmark = pytest.mark.unit

START = StartJob(job_id="once", attempt=1, backend=NoopSpec(delay_s=0.5, output="side effect\n"))


async def test_repeated_start_after_a_cut_runs_the_program_once(tmp_path):
    events: dict[int, Event] = {}  # by seq: a resent event is the same event
    connections = 0
    done = asyncio.Event()

    async def switchboard(ws) -> None:
        nonlocal connections
        connections += 1
        hello = codec.decode_from_supervisor(await ws.recv(decode=False))
        assert isinstance(hello, Hello)
        await ws.send(
            codec.encode(Welcome(version="1.0", session=connections, last_seq=0)), text=True
        )
        await ws.send(codec.encode(START), text=True)  # sent again on every connection
        async for frame in ws:
            event = codec.decode_from_supervisor(frame)
            if not isinstance(event, Event):
                continue
            events[event.seq] = event
            if connections == 1:
                # Cut before acknowledging anything: the supervisor must resend, and this
                # "switchboard" will send the StartJob again.
                ws.transport.abort()
                return
            await ws.send(codec.encode(Ack(seq=event.seq)), text=True)
            if isinstance(event, JobExit):
                done.set()

    server = await websockets.serve(
        switchboard, "127.0.0.1", 0, subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)]
    )
    port = server.sockets[0].getsockname()[1]
    supervisor = BackendSupervisor(NoopBackend(), work_dir=tmp_path)
    connector = WebSocketConnector(
        supervisor, f"ws://127.0.0.1:{port}/ws/supervisor", "sbt_test", supervisor_id="dup"
    )
    running = asyncio.create_task(connector.run())
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        connector.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        server.close()
    assert connections >= 2
    outputs = [e for e in events.values() if isinstance(e, Output)]
    assert [o.data for o in outputs] == [b"side effect\n"]  # one run, one side effect
    assert sorted(events) == list(range(1, len(events) + 1))  # no seq lost or reused
