"""What the outbox of a supervisor connection sends in one write: the messages queued by
the time its writer runs, through the WebSocket protocol's one-write extension
(switchboard.wsprotocol), never the close handshake among them, and about WRITE_BYTES at
most. The socket here is a recording stand-in for Litestar's WebSocket, so the writes the
outbox asks for can be counted; the extension itself, on uvicorn's real transport, carries
every StartJob and Ack of the process tests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from protocol.connection import Goodbye
from protocol.exceptions import CloseCode
from switchboard.config import Settings
from switchboard.outbox import WRITE_BYTES, Outbox
from switchboard.wsprotocol import SEND_TEXTS_EXTENSION

pytestmark = pytest.mark.unit


class RecordingSocket:
    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.sent: list[dict[str, Any]] = []
        self.scope: dict[str, Any] = {"extensions": {SEND_TEXTS_EXTENSION: self.send_texts}}

    async def send_texts(self, texts: list[bytes]) -> None:
        self.writes.append(list(texts))

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def _outbox(socket: RecordingSocket) -> Outbox:
    return Outbox(socket, Settings(), "s1", set(), lambda why, what: None)  # type: ignore[arg-type]


async def _drained(outbox: Outbox) -> None:
    for _ in range(100):
        if not outbox._items and outbox._writer is None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the outbox did not drain")


async def test_messages_queued_together_go_in_one_write_in_order() -> None:
    socket = RecordingSocket()
    outbox = _outbox(socket)
    frames = [f'{{"n":{n}}}'.encode() for n in range(5)]
    for frame in frames:
        outbox.send(frame)
    await _drained(outbox)
    assert socket.writes == [frames]
    outbox.send(b'{"n":5}')  # queued after: a write of its own
    await _drained(outbox)
    assert socket.writes == [frames, [b'{"n":5}']]
    assert socket.sent == []


async def test_a_write_holds_about_write_bytes_and_a_larger_message_goes_alone() -> None:
    socket = RecordingSocket()
    outbox = _outbox(socket)
    big = b"x" * (WRITE_BYTES + 1)
    small = b"y" * (WRITE_BYTES // 3)
    for frame in (small, small, small, small, big, small):
        outbox.send(frame)
    await _drained(outbox)
    assert [len(w) for w in socket.writes] == [3, 1, 1, 1]
    assert [m for write in socket.writes for m in write] == [small, small, small, small, big, small]


async def test_the_close_handshake_goes_alone_after_the_goodbye() -> None:
    socket = RecordingSocket()
    outbox = _outbox(socket)
    goodbye = Goodbye(b'{"type":"protocol_error"}', CloseCode.GOING_AWAY, "stopping", "stopping")
    outbox.close(goodbye)
    await _drained(outbox)
    assert socket.writes == [[goodbye.frame]]
    [handshake] = socket.sent
    assert handshake["type"] == "websocket.close" and handshake["code"] == int(goodbye.code)
