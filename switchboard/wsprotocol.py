"""uvicorn's sans-I/O WebSocket protocol, with a way to drop a connection whose peer has
stopped reading.

Why a subclass: through ASGI an application can only *send* on a WebSocket, and uvicorn's
send waits, with no deadline, until the transport's write buffer drains below its
low-water mark; its close goes through the same send, then ends with `transport.close()`,
which also waits for the buffer to drain. A peer that stops reading (a frozen process, a
paused VM) therefore holds both forever. This protocol offers the application one more
operation in the ASGI scope, `scope["extensions"][ABORT_EXTENSION]()`: abort the transport
(drop what is buffered, RST), after which the connection ends as if the peer had gone
(`websocket.disconnect`, and any send blocked on the buffer fails); and one more,
`scope["extensions"][SEND_TEXTS_EXTENSION](texts)`: send several text messages, already
UTF-8, in one write to the socket (through ASGI each message is decoded to str, encoded
again and written alone: a syscall each, and a wake of the peer each). It also turns the
closing handshake's own timer into an abort, so a close the peer never answers or never
reads does not leave the socket open.

It also refuses, as the protocol says (docs/protocol.md §10), the messages websockets and
uvicorn would otherwise end the connection for without a word: one over the size limit
(close 1009: websockets reads the frame's header, never the frame) and a text message that
is not valid UTF-8 (close 1007; uvicorn logged a traceback). Each gets a protocol_error
first (protocol.frames), and the application gets a `websocket.disconnect` carrying the
code, the reason and REFUSED, so that it logs and counts the refusal once. (A binary
message is handed to the application, whose Connection refuses it with 1003.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.exceptions import InvalidState
from websockets.server import ServerProtocol

from protocol import frames
from protocol.exceptions import CloseCode

#: The scope extension holding the connection's abort (a callable taking no argument).
ABORT_EXTENSION = "switchboard.abort"
#: The scope extension sending text messages in one write (an async callable taking a
#: list of UTF-8 bytes; it waits, as an ASGI send does, while the transport's buffer is
#: full, and raises uvicorn's ClientDisconnected once the connection is gone).
SEND_TEXTS_EXTENSION = "switchboard.send_texts"
#: Set (True) in the `websocket.disconnect` of a connection this layer closed because of
#: what the peer sent; its `code` and `reason` say why, as the peer was told.
REFUSED = "switchboard.refused"


def refusal(message: Mapping[str, Any]) -> tuple[int, str] | None:
    """The close code and reason of a `websocket.disconnect` this layer caused by refusing
    the peer's message; None for any other ASGI message."""
    if not message.get(REFUSED):
        return None
    return int(message["code"]), str(message.get("reason", ""))


def message_data(message: Mapping[str, Any]) -> str | bytes:
    """A `websocket.receive`'s message: str for a text one, bytes for a binary one."""
    text = message.get("text")
    return text if text is not None else message.get("bytes") or b""


class _SayingServerProtocol(frames.SaysBeforeFailing, ServerProtocol):
    """websockets' server side, which sends a protocol_error before it fails a connection
    for what the peer sent (protocol.frames.before_failing)."""


class AbortableWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn builds its ServerProtocol here, with no way to name another class: make
        # it ours (a method more, and a field set only on refusing), keeping every argument
        # uvicorn gave it.
        self.conn.__class__ = _SayingServerProtocol

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # upgraded: the application's task has not run yet
            scope["extensions"][ABORT_EXTENSION] = self.abort
            scope["extensions"][SEND_TEXTS_EXTENSION] = self.send_texts

    async def send_texts(self, texts: list[bytes]) -> None:
        """Send text messages (UTF-8, checked by whoever encoded them) in one write, as
        uvicorn's send sends one: after the transport's buffer has drained, never once
        the close was sent."""
        await self.writable.wait()
        if (
            self.disconnected
            or self.close_sent
            or not self.handshake_complete
            or self.initial_response is not None
        ):
            raise ClientDisconnected()
        try:
            for text in texts:
                self.conn.send_text(text)
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(self.conn.data_to_send()))

    def abort(self) -> None:
        """Drop the connection now, with whatever is still buffered for the peer."""
        if not self.disconnected and self.transport is not None:
            self.transport.abort()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.close" and self.close_timer is not None:
            # uvicorn's timer would call transport.close(), which waits for a peer that
            # does not read: abort instead when the closing handshake runs out of time.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.abort)

    def send_receive_event_to_app(self) -> None:
        # uvicorn decodes text itself and, on invalid UTF-8, logs a traceback and closes
        # 1007 without a word: check first, and refuse as the protocol says.
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            if not data.isascii():  # the common case, JSON in ASCII, costs one scan
                try:
                    data.decode()
                except UnicodeDecodeError as error:
                    self.frames = []
                    self.conn.fail(CloseCode.INVALID_PAYLOAD, frames.not_utf8(error))
                    self.handle_parser_exception()
                    return
        super().send_receive_event_to_app()

    def handle_parser_exception(self) -> None:
        if self.close_sent:
            return  # refused already: what still comes is read and discarded (below)
        refused = getattr(self.conn, "refused", None)
        if refused is None:  # a broken frame (1002), a connection lost: uvicorn's way
            super().handle_parser_exception()
            return
        # As uvicorn's, with REFUSED in the event (a key ASGI's type does not name): the
        # application logs and counts it.
        event = {
            "type": "websocket.disconnect",
            "code": refused.code,
            "reason": refused.reason,
            REFUSED: True,
        }
        self.queue.put_nowait(cast(Any, event))
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        # Half-close, not close: a peer still sending (the rest of an oversized message)
        # would get a reset for the unread bytes, and a reset may destroy the
        # protocol_error and close frame before the peer reads them. The connection now
        # reads and discards (websockets' parser does) until the peer's EOF, for at most
        # close_timeout.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.close_timer = self.loop.call_later(self.close_timeout, self.abort)
        else:
            self.transport.close()

    def on_task_complete(self, task: Any) -> None:
        # (A callback rather than an override of run_asgi: a coroutine frame more for
        # every connection would cost memory on a switchboard holding thousands.)
        super().on_task_complete(task)
        if self.close_timer is None and not self.disconnected:
            # The application returned without a closing handshake: uvicorn has called
            # transport.close(), which completes only once the peer reads what is buffered.
            self.close_timer = self.loop.call_later(self.close_timeout, self.abort)
