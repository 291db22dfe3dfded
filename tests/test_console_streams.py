"""A device console's stream at the switchboard (protocol 1.6), with a supervisor played
by the test over a real WebSocket: a run granted `board-x` may send `console:board-x`,
stored and served like stdout; a `console:` stream of a device the run was not granted,
or one on a connection that negotiated 1.5, is a protocol error (1007) whose reason names
the stream; a stream name outside the grammar never gets past the decoder."""

from __future__ import annotations

import asyncio
import time

import pytest

from protocol import codec
from protocol.messages import (
    Ack,
    DeviceInfo,
    Hello,
    JobStateChanged,
    Output,
    StartJob,
    Welcome,
)
from protocol.state import Phase
from protocol.tokens import new_token, token_sha256
from protocol.versions import supported_versions
from tests.harness import Switchboard, wait_for
from tests.supervisor_ws import closed_with, connect_ws

pytestmark = pytest.mark.process

DEVICES = [DeviceInfo(id=d, class_="conboard", console=True) for d in ("board-x", "board-y")]


async def _hello(ws, supervisor_id: str, credential: str, versions: list[str]) -> Welcome:
    hello = Hello(
        supervisor_id=supervisor_id,
        name=supervisor_id,
        versions=versions,
        backends=["noop"],
        max_jobs=4,
        credential_sha256=token_sha256(credential).hex(),
        devices=DEVICES,
    )
    await ws.send(codec.encode(hello), text=True)
    welcome = codec.decode_from_switchboard(await ws.recv(decode=False))
    assert isinstance(welcome, Welcome), welcome
    return welcome


async def _next_start(ws) -> StartJob:
    deadline = time.monotonic() + 20
    while True:
        message = codec.decode_from_switchboard(
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
        )
        if isinstance(message, StartJob):
            return message


async def _acked(ws, seq: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        message = codec.decode_from_switchboard(
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
        )
        if isinstance(message, Ack) and message.seq >= seq:
            assert not message.problems, message.problems
            return


async def _scenario(switchboard: Switchboard, client) -> None:
    registration = switchboard.create_token("supervisor")
    credential = new_token()
    async with connect_ws(switchboard, registration) as ws:
        await _hello(ws, "con-host", credential, supported_versions())
        submitted = client.post(
            "/api/v1/jobs",
            json={"name": "console", "backend": {"kind": "noop"}, "resources": {"conboard": 1}},
        )
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        start = await _next_start(ws)
        assert start.job_id == job_id and start.devices == ["board-x"]
        running = JobStateChanged(seq=1, job_id=job_id, attempt=1, phase=Phase.RUNNING)
        data = b"boot\r\n\xff\xfe> "
        granted = Output(
            seq=2, job_id=job_id, attempt=1, stream="console:board-x", offset=0, data=data
        )
        await ws.send(codec.encode(running), text=True)
        await ws.send(codec.encode(granted), text=True)
        await _acked(ws, 2)
        # The other board was not granted to this run: the connection ends, saying why.
        other = Output(
            seq=3, job_id=job_id, attempt=1, stream="console:board-y", offset=0, data=b"x"
        )
        await ws.send(codec.encode(other), text=True)
        code, reason, said = await closed_with(ws)
    assert code == 1007, (code, reason)
    [goodbye] = [m for m in said if m.get("type") == "protocol_error"]
    assert "console:board-y" in goodbye["reason"] and "granted: board-x" in goodbye["reason"]
    stored = client.get(
        f"/api/v1/jobs/{job_id}/output", params={"stream": "console:board-x"}
    ).content
    assert stored == data
    assert client.get(f"/api/v1/jobs/{job_id}/output", params={"stream": "stdout"}).content == b""

    # A connection that negotiated 1.5 may send no console stream at all.
    async with connect_ws(switchboard, credential) as ws:
        await _hello(ws, "con-host", credential, ["1.5", "1.4"])
        late = Output(
            seq=3, job_id=job_id, attempt=1, stream="console:board-x", offset=len(data), data=b"!"
        )
        await ws.send(codec.encode(late), text=True)
        code, reason, said = await closed_with(ws)
    assert code == 1007 and "1.6" in reason, (code, reason)

    # A name outside the grammar fails decoding, naming the field.
    async with connect_ws(switchboard, credential) as ws:
        await _hello(ws, "con-host", credential, supported_versions())
        frame = codec.encode(late).replace(b'"console:board-x"', b'"console:../x"')
        await ws.send(frame, text=True)
        code, reason, said = await closed_with(ws)
    [goodbye] = [m for m in said if m.get("type") == "protocol_error"]
    assert code == 1007 and "$.stream" in goodbye["reason"], (code, goodbye)


def test_a_console_stream_must_name_a_device_granted_to_its_run(switchboard: Switchboard) -> None:
    client = switchboard.client()
    try:
        asyncio.run(_scenario(switchboard, client))
        text = client.get("/metrics").text
        assert 'switchboard_protocol_errors_total{code="1007"}' in text
        wait_for(
            lambda: client.get("/api/v1/devices/board-x").status_code == 200,
            "the declared board in the inventory",
        )
    finally:
        client.close()
