"""protocol.frames: what each side says before refusing a WebSocket message that is no
protocol message (the process tests in test_bad_frames.py show it on the wire)."""

from __future__ import annotations

import pytest

from protocol import codec, frames
from protocol.connection import Connection, Goodbye, Role, State
from protocol.exceptions import CloseCode
from protocol.messages import Heartbeat, Hello, ProtocolErrorMessage

pytestmark = pytest.mark.unit


def _established() -> Connection:
    connection = Connection(Role.SWITCHBOARD)
    hello = Hello(supervisor_id="s1", name="s1", versions=["1.2"])
    assert isinstance(connection.receive(codec.encode(hello).decode()), Hello)
    connection.welcome(
        session=1, stored_seq=0, heartbeat_interval_s=5, heartbeat_timeout_s=20, enrolled=False
    )
    assert connection.state is State.ESTABLISHED
    return connection


@pytest.mark.parametrize("state", ["awaiting_hello", "established"])
def test_a_binary_message_is_refused_whatever_it_holds(state: str) -> None:
    connection = Connection(Role.SWITCHBOARD) if state == "awaiting_hello" else _established()
    goodbye = frames.receive(connection, codec.encode(Heartbeat(at=1.0)))
    assert isinstance(goodbye, Goodbye)
    assert goodbye.code is CloseCode.UNSUPPORTED_DATA
    assert goodbye.reason == frames.BINARY_MESSAGE == goodbye.close_reason
    told = codec.decode_from_switchboard(goodbye.frame)
    assert told == ProtocolErrorMessage(code=1003, reason=frames.BINARY_MESSAGE)
    assert connection.state is State.CLOSED


def test_a_text_message_goes_to_the_connection() -> None:
    connection = _established()
    assert frames.receive(connection, codec.encode(Heartbeat(at=1.0)).decode()) == Heartbeat(at=1.0)


@pytest.mark.parametrize(
    ("code", "library_says", "words"),
    [
        (1009, "frame with 2000000 bytes exceeds limit of 1048576 bytes", "message too big: "),
        (1009, "too many fragments", "message too big: "),
        (1009, "", "message too big: over 1048576 bytes"),
        (1007, "invalid start byte at position 3", "text message is not valid UTF-8: "),
    ],
)
def test_what_is_said_before_the_library_fails(code: int, library_says: str, words: str) -> None:
    said = frames.before_failing(code, library_says)
    assert said is not None
    reason, frame = said
    assert reason.startswith(words) and reason.endswith(library_says)
    assert codec.decode_from_supervisor(frame) == ProtocolErrorMessage(code=code, reason=reason)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1006, 1011])
def test_nothing_is_said_before_other_closes(code: int) -> None:
    """A broken framing (1002) or a lost connection (1006) gets websockets' close alone."""
    assert frames.before_failing(code, "whatever") is None


def test_the_reason_fits_a_close_frame() -> None:
    said = frames.before_failing(1007, "é" * 200)
    assert said is not None
    reason, frame = said
    assert len(reason.encode()) <= 123
    assert codec.decode_from_supervisor(frame).reason == reason  # type: ignore[union-attr]


def test_not_utf8_words_are_websockets_own() -> None:
    try:
        b'{"x":"\xff"}'.decode()
    except UnicodeDecodeError as error:
        assert frames.not_utf8(error) == "invalid start byte at position 6"
