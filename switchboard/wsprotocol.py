"""uvicorn's sans-I/O WebSocket protocol, with a way to drop a connection whose peer has
stopped reading.

Why a subclass: through ASGI an application can only *send* on a WebSocket, and uvicorn's
send waits, with no deadline, until the transport's write buffer drains below its
low-water mark; its close goes through the same send, then ends with `transport.close()`,
which also waits for the buffer to drain. A peer that stops reading (a frozen process, a
paused VM) therefore holds both forever. This protocol offers the application one more
operation in the ASGI scope, `scope["extensions"][ABORT_EXTENSION]()`: abort the transport
(drop what is buffered, RST), after which the connection ends as if the peer had gone
(`websocket.disconnect`, and any send blocked on the buffer fails). It also turns the
closing handshake's own timer into an abort, so a close the peer never answers or never
reads does not leave the socket open.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

#: The scope extension holding the connection's abort (a callable taking no argument).
ABORT_EXTENSION = "switchboard.abort"


class AbortableWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # upgraded: the application's task has not run yet
            scope["extensions"][ABORT_EXTENSION] = self.abort

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

    def on_task_complete(self, task: Any) -> None:
        # (A callback rather than an override of run_asgi: a coroutine frame more for
        # every connection would cost memory on a switchboard holding thousands.)
        super().on_task_complete(task)
        if self.close_timer is None and not self.disconnected:
            # The application returned without a closing handshake: uvicorn has called
            # transport.close(), which completes only once the peer reads what is buffered.
            self.close_timer = self.loop.call_later(self.close_timeout, self.abort)
