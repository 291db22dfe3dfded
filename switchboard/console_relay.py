"""One attached console client (`GET /api/v1/devices/{id}/console`, a WebSocket): what its
device's supervisor sends for the session waits here for the client, bounded.

The supervisor connection's reader hands each `console_data` to `feed`, which never
waits: the bytes join a buffer of at most BUFFER_BYTES; a client so slow that the buffer
would overflow is dropped, with the reason, rather than held in memory or allowed to hold
up the supervisor connection (and the other sessions and runs on it). The client's own
task sends from the buffer, each send with a deadline.
"""

from __future__ import annotations

import asyncio

#: Bytes of console output one client may have waiting to be sent to it.
BUFFER_BYTES = 1024 * 1024


class ConsoleRelay:
    """The buffer between one session's supervisor and its client."""

    def __init__(self, buffer_bytes: int = BUFFER_BYTES) -> None:
        self._buffer_bytes = buffer_bytes
        self._pieces: list[tuple[int, bytes]] = []
        self._size = 0
        self._wake = asyncio.Event()
        #: Why the session ended (None: it goes on), and whose doing: "supervisor" (it
        #: closed the session or its connection ended), "too_slow" (the client), or
        #: "revoked" (the client may no longer attach).
        self.ended: str | None = None
        self.ended_by = ""
        #: While set, what comes is dropped (the client is shown a run's stored stream,
        #: which carries the same bytes).
        self.paused = False

    def feed(self, offset: int, data: bytes) -> None:
        """Bytes [offset, offset + len) of the device's console (never waits)."""
        if self.ended is not None or self.paused:
            return
        if self._size + len(data) > self._buffer_bytes:
            self._end(f"the client fell behind: {self._buffer_bytes} bytes not taken", "too_slow")
            return
        self._pieces.append((offset, data))
        self._size += len(data)
        self._wake.set()

    def closed(self, reason: str) -> None:
        """The supervisor ended the session, or its connection ended."""
        self._end(reason, "supervisor")

    def end(self, reason: str, by: str) -> None:
        """End the session: `by` says whose doing (metrics.CONSOLE_END_REASONS)."""
        self._end(reason, by)

    def _end(self, reason: str, by: str) -> None:
        if self.ended is None:
            self.ended, self.ended_by = reason, by
            self._pieces.clear()
            self._size = 0
            self._wake.set()

    async def take(self) -> list[tuple[int, bytes]] | None:
        """Everything waiting (oldest first), once there is some; None once ended."""
        while not self._pieces and self.ended is None:
            self._wake.clear()
            await self._wake.wait()
        if self.ended is not None:
            return None
        pieces, self._pieces, self._size = self._pieces, [], 0
        return pieces
