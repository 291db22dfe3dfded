"""What a WebSocket message must be before it is a protocol message, on either side:
text (binary is refused with 1003), valid UTF-8 (1007), at most MAX_FRAME_BYTES (1009).
docs/protocol.md §1, §2 and §10.

The refusal is the one every protocol error gets: a protocol_error saying why, then the
close with its code. A binary message is refused here, by the Connection; the other two
are found by the WebSocket library while it reads (a message over the limit is never
buffered whole), so each side's WebSocket layer sends `refusal_frame` just before the close
the library sends (`before_failing`).
"""

from __future__ import annotations

from typing import Any

from websockets.frames import Close
from websockets.protocol import State

from . import codec, limits
from .connection import Connection, Received
from .exceptions import CloseCode
from .messages import ProtocolErrorMessage

#: The reason a binary message is refused with (close 1003).
BINARY_MESSAGE = "binary frames are not part of the protocol; send JSON as text frames"

#: Close codes for which a WebSocket library fails a connection on its own, while reading,
#: and which the protocol wants explained first: invalid UTF-8 in a text message, a
#: message over the limit.
_SAID_BEFORE_FAILING = frozenset({CloseCode.INVALID_PAYLOAD, CloseCode.MESSAGE_TOO_BIG})


def receive(connection: Connection, data: str | bytes) -> Received:
    """Hand one WebSocket message to `connection`: `data` as WebSocket libraries give it,
    str for a text message, bytes for a binary one (refused: the Connection's goodbye)."""
    if isinstance(data, bytes):
        return connection.fail(CloseCode.UNSUPPORTED_DATA, BINARY_MESSAGE)
    return connection.receive(data)


def before_failing(code: int, reason: str) -> tuple[str, bytes] | None:
    """What to say before a WebSocket library fails the connection with `code`: the close
    reason to use and the protocol_error to send first; None if the library's close needs
    no word first (1006, a connection already broken; 1002, a broken framing)."""
    if code not in _SAID_BEFORE_FAILING:
        return None
    if code == CloseCode.MESSAGE_TOO_BIG:
        # The library's reason says how big ("frame with N bytes exceeds limit of M bytes").
        reason = f"message too big: {reason or f'over {limits.MAX_FRAME_BYTES} bytes'}"
    else:
        reason = f"text message is not valid UTF-8: {reason}"
    reason = _fit(reason)
    return reason, refusal_frame(CloseCode(code), reason)


class SaysBeforeFailing:
    """Mixin for a websockets sans-I/O protocol, client or server side (listed before it
    in the bases): it sends the protocol_error `before_failing` gives just before the
    library fails the connection, and keeps the close it sent in `refused` (None: not
    failed that way)."""

    refused: Close | None = None

    def fail(self, code: int, reason: str = "") -> None:
        ws: Any = self  # a websockets Protocol: state, send_text, and the fail it overrides
        said = before_failing(code, reason) if ws.state is State.OPEN else None
        if said is not None:
            reason, frame = said
            ws.send_text(frame)
            self.refused = Close(code, reason)
        super().fail(code, reason)  # type: ignore[misc]


def not_utf8(error: UnicodeDecodeError) -> str:
    """The library's words for invalid UTF-8, for `before_failing` (websockets' own)."""
    return f"{error.reason} at position {error.start}"


def refusal_frame(code: CloseCode, reason: str) -> bytes:
    """The encoded protocol_error that goes before a close with `code`."""
    return codec.encode(ProtocolErrorMessage(code=int(code), reason=reason))


def _fit(reason: str) -> str:
    """Cut to fit a close frame (123 bytes of UTF-8), so the protocol_error and the close
    say the same."""
    data = reason.encode()
    return reason if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."
