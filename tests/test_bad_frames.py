"""WebSocket messages that are no protocol message, refused on both sides as
docs/protocol.md §10 says: a binary message (1003), a text message that is not UTF-8
(1007), one over 1 MiB (1009). Each time the sender is told first (protocol_error, with
the code and a reason), then the connection closes with that code; the refusing side
counts it (`*_protocol_errors_total{code}`), logs it once, and logs no traceback.

The switchboard is a real process, spoken to with a raw `websockets` client; the
supervisor is a real `supervisor run` process, spoken to by a scripted `websockets` server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.server import ServerConnection

from protocol import codec, limits
from protocol.exceptions import CloseCode
from protocol.messages import Hello, Welcome
from tests.harness import (
    Process,
    Switchboard,
    free_port,
    start_supervisor,
    token_file_for,
    wait_for,
)
from tests.scrape import sample_value, scrape
from tests.supervisor_ws import closed_with, connect_ws, handshake

pytestmark = pytest.mark.process

#: Pinned here as docs/protocol.md §10 gives it (not taken from the code under test).
BINARY = "binary frames are not part of the protocol; send JSON as text frames"


async def _send_binary(ws) -> None:
    await ws.send(b'{"type":"heartbeat","at":1.0}')  # valid JSON, but in a binary frame


async def _send_not_utf8(ws) -> None:
    await ws.send(b'{"type":"heartbeat","at":1.0,"x":"\xff\xfe"}', text=True)


async def _send_huge_header(ws) -> None:
    """Only the head of a text frame claiming 1 TiB: refused on its header, the payload
    never read (it is never sent: nothing could buffer it)."""
    masked = ws.protocol.side.name == "CLIENT"  # a client masks its frames
    head = bytes([0x81, (0x80 if masked else 0) | 127]) + struct.pack("!Q", 1 << 40)
    ws.transport.write(head + (secrets.token_bytes(4) if masked else b""))


async def _send_in_fragments(ws) -> None:
    """A text message in two fragments, each under the limit, together over it."""
    half = secrets.token_hex(limits.MAX_FRAME_BYTES // 3)  # 2/3 MiB of ASCII each
    await ws.send([half, half])


#: case -> (how to send it, the close code, words the reason has)
CASES: dict[str, tuple[Callable[..., Awaitable[None]], int, str]] = {
    "binary": (_send_binary, CloseCode.UNSUPPORTED_DATA, BINARY),
    "not_utf8": (_send_not_utf8, CloseCode.INVALID_PAYLOAD, "not valid UTF-8"),
    "too_big": (_send_huge_header, CloseCode.MESSAGE_TOO_BIG, "message too big"),
    "too_big_in_fragments": (_send_in_fragments, CloseCode.MESSAGE_TOO_BIG, "message too big"),
}


def _full_log(process: Process) -> str:
    """All the process has logged so far (its log goes straight to the file)."""
    return process.log_path.read_text(errors="replace")


def _assert_told(frames: list[dict], code: int, reason: str, words: str) -> None:
    """The last message before the close was the protocol_error, and says what the close
    says."""
    assert frames, "no protocol_error before the close"
    told = frames[-1]
    assert told["type"] == "protocol_error", told
    assert told["code"] == code, told
    assert words in told["reason"], told
    assert told["reason"] == reason, (told, reason)


# --- the switchboard refuses -----------------------------------------------------------


@pytest.mark.parametrize("when", ["after_hello", "before_hello"])
@pytest.mark.parametrize("case", list(CASES))
async def test_switchboard_refuses_a_frame_that_is_no_message(
    switchboard: Switchboard, case: str, when: str
):
    send, code, words = CASES[case]
    metrics_url = f"{switchboard.url}/metrics"
    before = sample_value(scrape(metrics_url), "switchboard_protocol_errors_total", code=str(code))
    log_before = _full_log(switchboard.process)
    supervisor_id = f"frames-{case.replace('_', '-')}-{secrets.token_hex(3)}"
    token = switchboard.create_token("supervisor")
    async with connect_ws(switchboard, token) as ws:
        if when == "after_hello":
            await handshake(ws, supervisor_id)
        await send(ws)
        got_code, reason, frames = await asyncio.wait_for(closed_with(ws), 10)
    assert got_code == code
    _assert_told(frames, code, reason, words)

    wait_for(
        lambda: (
            sample_value(scrape(metrics_url), "switchboard_protocol_errors_total", code=str(code))
            == before + 1
        ),
        "the protocol error counted",
    )
    new = _full_log(switchboard.process)[len(log_before) :]
    said = [line for line in new.splitlines() if words in line]
    assert len(said) == 1, new
    assert (supervisor_id if when == "after_hello" else "before its hello") in said[0]
    assert f"({code})" in said[0]
    assert "Traceback" not in new, new
    # The switchboard serves on.
    async with connect_ws(switchboard, switchboard.create_token("supervisor")) as fresh:
        await handshake(fresh, f"after-{supervisor_id}")


async def test_an_oversized_frame_is_refused_on_its_header(switchboard: Switchboard):
    """The refusal comes while the 1 TiB payload is still unsent: the switchboard read no
    more than the frame's head."""
    async with connect_ws(switchboard, switchboard.create_token("supervisor")) as ws:
        await handshake(ws, f"frames-head-{secrets.token_hex(3)}")
        await _send_huge_header(ws)
        code, _, frames = await asyncio.wait_for(closed_with(ws), 5)
    assert code == CloseCode.MESSAGE_TOO_BIG
    assert frames[-1]["code"] == CloseCode.MESSAGE_TOO_BIG
    assert str(limits.MAX_FRAME_BYTES) in frames[-1]["reason"]


async def test_text_that_is_utf8_but_not_ascii_is_taken(switchboard: Switchboard):
    async with connect_ws(switchboard, switchboard.create_token("supervisor")) as ws:
        await handshake(ws, f"frames-utf8-{secrets.token_hex(3)}")
        note = json.dumps(
            {"type": "heartbeat", "at": 1.0, "note": "é ü — 日本"}, ensure_ascii=False
        )
        await ws.send(note.encode(), text=True)
        heard = []  # (a heartbeat may come meanwhile)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for frame in ws:
                    heard.append(json.loads(frame)["type"])
        assert "protocol_error" not in heard
        assert ws.close_code is None
        await ws.ping()


# --- the supervisor refuses -----------------------------------------------------------


class _ScriptedSwitchboard:
    """A WebSocket server speaking as a switchboard: it welcomes each Hello, sends the bad
    message on the first connection only, and keeps what the supervisor answered."""

    def __init__(self, send: Callable[..., Awaitable[None]]) -> None:
        self._send = send
        self.connections = 0
        self.answers: list[dict] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.done = asyncio.Event()

    async def handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        first = self.connections == 1
        hello = codec.decode_from_supervisor(await ws.recv(decode=False))
        assert isinstance(hello, Hello)
        welcome = Welcome(version=hello.versions[0], session=self.connections, last_seq=0)
        await ws.send(codec.encode(welcome), text=True)
        if not first:
            await ws.wait_closed()  # a later connection is left alone
            return
        await self._send(ws)
        try:
            async for frame in ws:
                self.answers.append(json.loads(frame))
        except websockets.ConnectionClosed:
            pass
        self.close_code = ws.close_code
        self.close_reason = ws.close_reason or ""
        self.done.set()


@pytest.mark.parametrize("case", list(CASES))
async def test_supervisor_refuses_a_frame_that_is_no_message(
    switchboard: Switchboard, tmp_path: Path, case: str
):
    send, code, words = CASES[case]
    script = _ScriptedSwitchboard(send)
    server = await websockets.serve(
        script.handle,
        "127.0.0.1",
        0,
        subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
        max_size=None,
    )
    port = server.sockets[0].getsockname()[1]
    name = f"refuses-{case.replace('_', '-')}"
    # A credential bound to the name: the scripted switchboard needs no enrolment.
    token_file = token_file_for(
        tmp_path / "token", switchboard.create_token("supervisor", supervisor_id=name)
    )
    metrics_port = free_port()
    supervisor = start_supervisor(
        switchboard,
        tmp_path,
        name=name,
        backend="noop",
        url=f"ws://127.0.0.1:{port}",
        token_file=token_file,
        extra_args=("--metrics-port", str(metrics_port)),
    )
    try:
        await asyncio.wait_for(script.done.wait(), 20)
        assert script.close_code == code
        _assert_told(script.answers, code, script.close_reason, words)

        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        await asyncio.to_thread(
            wait_for,
            lambda: (
                sample_value(
                    scrape(metrics_url), "supervisor_protocol_errors_total", code=str(code)
                )
                == 1
            ),
            "the protocol error counted",
        )
        # It reconnects (the next connection is left alone), and has said it once.
        await asyncio.to_thread(wait_for, lambda: script.connections >= 2, "a reconnect")
        log = _full_log(supervisor)
        said = [line for line in log.splitlines() if words in line]
        assert len(said) == 1, log
        assert f"close code {code}" in said[0]
        assert "Traceback" not in log, log
    finally:
        supervisor.stop()
        server.close()
        await server.wait_closed()
