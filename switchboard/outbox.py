"""What waits to be sent to one supervisor, and the one task that sends it.

Nothing that serves everyone waits on one supervisor's socket: sending only queues the
encoded message in the connection's outbox (bounded in bytes and messages) and returns;
one writer task per connection, alive only while the outbox holds something, sends it.
A send that waits on the socket past the send timeout, or an outbox that overflows, cuts
the connection (`cut`, the connection's to decide how): with its goodbye and the close
handshake when the socket can take them, else by aborting the connection (which the
socket's close would wait on for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from litestar import WebSocket

from protocol.connection import Goodbye
from protocol.messages import RunRef
from switchboard.config import Settings
from switchboard.wsprotocol import ABORT_EXTENSION, SEND_TEXTS_EXTENSION

log = logging.getLogger("switchboard.outbox")

#: How the outbox asks its connection to end (reason: one of metrics.CUT_REASONS, detail).
Cut = Callable[[str, str], None]
#: Bytes of queued messages sent in one write, about (a larger message goes alone).
WRITE_BYTES = 256 * 1024


class Outbox:
    # One per connected supervisor, thousands at once: no per-instance dict.
    __slots__ = (
        "_bytes",
        "_cut",
        "_items",
        "_send_since",
        "_starts",
        "_writer",
        "_writing",
        "closed",
        "name",
        "settings",
        "socket",
    )

    def __init__(
        self, socket: WebSocket, settings: Settings, name: str, writing: set[Outbox], cut: Cut
    ) -> None:
        self.socket = socket
        self.settings = settings
        self.name = name
        self._writing = writing
        self._cut = cut
        #: Encoded messages waiting for the writer, oldest first; last, once closing, the
        #: close handshake (an ASGI message). The writer task runs only while it holds
        #: something (idle connections are many, and each task costs memory).
        self._items: list[bytes | dict[str, Any]] = []
        self._bytes = 0
        self._writer: asyncio.Task[None] | None = None
        #: When the send under way began to wait on the socket (None: none waits).
        self._send_since: float | None = None
        #: StartJobs waiting for room in the outbox, by run, oldest first (see `start`).
        self._starts: dict[RunRef, bytes] = {}
        #: Closing or closed: nothing more is queued.
        self.closed = False

    @property
    def stuck(self) -> bool:
        """A send waits on the socket now."""
        return self._send_since is not None

    def send(self, frame: bytes | None) -> None:
        """Queue an encoded message; never waits. A closing outbox drops it (what was not
        sent is settled when the supervisor reconnects); one too full to take it cuts the
        connection."""
        if frame is None or self.closed:
            return
        # An empty outbox takes any one message (up to the frame limit).
        if self._items and self._is_full(len(frame)):
            self._cut(
                "outbox_full",
                f"{len(self._items)} messages ({self._bytes} bytes) already wait to be sent to it",
            )
            return
        self._append(frame)

    def start(self, run: RunRef, frame: bytes) -> None:
        """Queue a run's StartJob (`frame`, encoded). StartJobs wait apart from the outbox
        and move into it while it is at most half full: a dispatch pass or a reconnect can
        give a supervisor more large StartJobs than its outbox holds, but no more than it
        has slots (the store assigns no more), so they are bounded without cutting a
        healthy supervisor, and the other half of the outbox stays for acks, stops and
        heartbeats."""
        if self.closed:
            return
        self._starts[run] = frame
        self._move_starts()

    def stop(self, run: RunRef, frame: bytes | None) -> None:
        """Queue a run's StopJob, after its StartJob if that still waits (the supervisor
        must not hear of the stop first: it would ignore it, then start the run)."""
        start = self._starts.pop(run, None)
        if start is not None:
            self._append(start)  # bounded by the supervisor's slots like every StartJob
        self.send(frame)

    def _move_starts(self) -> None:
        settings = self.settings
        while self._starts and not self.closed:
            run, frame = next(iter(self._starts.items()))
            if self._items and (
                2 * len(self._items) >= settings.outbox_max_messages
                or 2 * (self._bytes + len(frame)) > settings.outbox_max_bytes
            ):
                return  # the writer moves more as it sends
            del self._starts[run]
            self._append(frame)

    def _is_full(self, size: int) -> bool:
        settings = self.settings
        return (
            len(self._items) >= settings.outbox_max_messages
            or self._bytes + size > settings.outbox_max_bytes
        )

    def _append(self, frame: bytes) -> None:
        self._items.append(frame)
        self._bytes += len(frame)
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
            self._writing.add(self)

    async def _write(self) -> None:
        """Send the outbox, oldest first, until it is empty: the messages queued by then
        in one write (up to WRITE_BYTES), the close handshake alone. Only the socket's send
        may wait (uvicorn's waits while the transport's buffer is full): `_send_since`
        tells the deadline watch how long it has."""
        items = self._items
        send_texts = self.socket.scope.get("extensions", {}).get(SEND_TEXTS_EXTENSION)
        try:
            while items:
                taken = _leading_texts(items) if send_texts is not None else 0
                self._send_since = time.monotonic()
                if taken:
                    texts = cast(list[bytes], items[:taken])
                    await send_texts(texts)
                    del items[:taken]
                    self._bytes -= sum(map(len, texts))
                else:
                    item = items[0]
                    if isinstance(item, bytes):
                        message: Any = {"type": "websocket.send", "text": item.decode()}
                    else:
                        message = item  # the close handshake
                    await self.socket.send(message)
                    del items[0]
                    if isinstance(item, bytes):
                        self._bytes -= len(item)
                self._send_since = None
                if self._starts:
                    self._move_starts()
        except Exception as exc:  # the connection is gone: nothing more can be sent
            log.debug("supervisor %s: sending failed: %r", self.name, exc)
            self.closed = True
            items.clear()
            self._bytes = 0
            self._starts.clear()
        finally:
            self._send_since = None
            self._writer = None
            self._writing.discard(self)

    def check_send_deadline(self, now: float) -> None:
        """Cut the connection if the send under way has waited on the socket too long."""
        since = self._send_since
        if since is not None and now - since > self.settings.send_timeout_s:
            self._cut("send_timeout", f"a message waited {now - since:.1f}s for it to read")

    def close(self, goodbye: Goodbye | None) -> None:
        """Send nothing more but `goodbye` and the close handshake; never waits. What is
        still queued is dropped (the supervisor's reconnect settles it); when a send already
        waits on the socket, the connection is aborted instead. Without a goodbye (the
        connection had ended already), only stop queueing."""
        self.closed = True
        self._starts.clear()  # settled when the supervisor reconnects
        if goodbye is None:
            return
        if self.stuck:
            self.abort()
            return
        handshake = {
            "type": "websocket.close",
            "code": int(goodbye.code),
            "reason": goodbye.close_reason,
        }
        self._items[:] = [goodbye.frame, handshake]
        self._bytes = len(goodbye.frame)
        self._start_writer()

    def abort(self) -> None:
        """Drop the connection at once."""
        if not abort(self.socket) and self._writer is not None:
            self._writer.cancel()  # another server: at least stop waiting on the socket

    async def finish(self, grace_s: float) -> None:
        """Wait until the writer has sent (or failed to send) the outbox, at most
        `grace_s`; then abort the connection if it still waits."""
        self.closed = True
        writer = self._writer
        if writer is None:
            return
        try:
            await asyncio.wait([writer], timeout=grace_s)
        finally:
            if self._writer is not None:
                self.abort()


def _leading_texts(items: list[bytes | dict[str, Any]]) -> int:
    """How many of the first items are encoded messages that go in one write: all up to
    the first that is not one (the close handshake), at least one, about WRITE_BYTES."""
    size = 0
    for count, item in enumerate(items):
        if not isinstance(item, bytes) or (count and size + len(item) > WRITE_BYTES):
            return count
        size += len(item)
    return len(items)


def abort(socket: WebSocket) -> bool:
    """Drop the connection at once, if the server offers it (switchboard.wsprotocol)."""
    drop = socket.scope.get("extensions", {}).get(ABORT_EXTENSION)
    if drop is None:
        return False
    drop()
    return True


@contextlib.asynccontextmanager
async def deadline(socket: WebSocket, seconds: float) -> AsyncIterator[None]:
    """Sends outside an outbox (refusals, a failed handshake) get the send timeout too:
    past it, the connection is aborted."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        abort(socket)
