"""switchboard.http_limits._HeadWithBody: a response's head goes out in one write with its
body's first piece, or alone at the end of the loop's turn if no body comes in it.

The transport here records its writes instead of sending them: how many writes a
response took is what is checked, and a socket's reader can't tell (the kernel joins
segments that arrive before a read). The real path is covered by every test that talks
HTTP to a switchboard (tests/test_http_limits.py: a streamed response's head)."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.http_limits import _HeadWithBody

pytestmark = pytest.mark.unit


class _Recording:
    """A transport that keeps what is written (see the module's docstring)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def _held() -> tuple[_Recording, _HeadWithBody]:
    recording = _Recording()
    return recording, _HeadWithBody(recording, asyncio.get_running_loop())  # type: ignore[arg-type]


async def test_head_and_body_go_out_in_one_write() -> None:
    recording, transport = _held()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert recording.writes == []
    transport.write(b"body")
    assert recording.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    transport.write(b"more")
    await asyncio.sleep(0)  # the turn's end flushes nothing more
    assert recording.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


async def test_a_head_without_a_body_in_the_same_turn_goes_out_alone() -> None:
    recording, transport = _held()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    await asyncio.sleep(0)
    assert recording.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    transport.write(b"event")
    assert recording.writes == [b"HTTP/1.1 200 OK\r\n\r\n", b"event"]


async def test_close_sends_a_held_head_first_and_the_rest_is_the_transport() -> None:
    recording, transport = _held()
    transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    transport.close()
    assert recording.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    assert recording.closed and transport.is_closing()
    assert transport.get_extra_info("peername") == "extra peername"
    await asyncio.sleep(0)
    assert len(recording.writes) == 1  # flushed once


async def test_a_head_held_when_the_connection_closes_is_dropped() -> None:
    recording, transport = _held()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    recording.closed = True  # the peer went away within the turn
    await asyncio.sleep(0)
    assert recording.writes == []
