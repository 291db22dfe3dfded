"""A run's console output, from the program's writes to sequenced Output events.

Writers may be worker threads (a Wasm guest's stdout callback, a Docker log reader) or
coroutines. Writes land in a per-stream buffer under a lock; one pump task on the event
loop takes whatever has gathered and sends it in chunks of at most MAX_OUTPUT_CHUNK bytes,
each addressed by its byte offset in the stream. While the pump is busy sending, new
writes pile up and go out together, so a chatty program makes few large events, not many
small ones.

Backpressure: a thread that writes while more than `high_water` bytes wait to be sent
blocks until the pump catches up (or the run is stopped); the pump itself waits whenever
the connector has too much unacknowledged. So a slow or broken link slows the program
instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable

from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.messages import STREAMS, Stream

SendChunk = Callable[[Stream, int, bytes], Awaitable[None]]

#: How long the pump lets a small write wait for company before sending it.
LINGER_S = 0.002


class OutputPump:
    def __init__(
        self,
        send: SendChunk,
        *,
        high_water: int = 4 * MAX_OUTPUT_CHUNK,
        stop: threading.Event | None = None,
    ) -> None:
        self._send = send
        #: Once set, writers no longer wait for room: a stopped run must be able to end
        #: even while the link is stalled (its last writes are still kept).
        self._stop = stop or threading.Event()
        self._high_water = high_water
        self._lock = threading.Condition()
        self._buffers: dict[Stream, bytearray] = {stream: bytearray() for stream in STREAMS}
        self._buffered = 0
        self._offsets: dict[Stream, int] = dict.fromkeys(STREAMS, 0)
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task = self._loop.create_task(self._pump())

    @property
    def offsets(self) -> dict[Stream, int]:
        """Bytes sent so far per stream."""
        return dict(self._offsets)

    def start_at(self, stream: Stream, offset: int) -> None:
        """Continue a stream at `offset` (a re-adopted run whose earlier output is stored)."""
        self._offsets[stream] = offset

    def write(self, stream: Stream, data: bytes) -> None:
        """Add bytes to a stream. Safe from any thread; blocks a thread (never the loop)
        while too much is waiting to be sent."""
        if not data:
            return
        on_loop = _on_loop(self._loop)
        with self._lock:
            if self._closed:
                raise RuntimeError("output is closed")
            if not on_loop:
                while (
                    self._buffered >= self._high_water
                    and not self._closed
                    and not self._stop.is_set()
                ):
                    self._lock.wait(0.05)
            self._buffers[stream] += data
            self._buffered += len(data)
        if on_loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def close(self) -> None:
        """Send everything written so far, then stop the pump."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._closing.set()
        self._wake.set()
        await self._task

    def abort(self) -> None:
        """Stop at once, dropping what was not sent (the process is going away)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._task.cancel()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                closed = self._closed
                small = self._buffered < MAX_OUTPUT_CHUNK
            if small and not closed:
                # Linger for company, but not past close(): the run's end waits on us.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), LINGER_S)
            with self._lock:
                taken = [(s, bytes(buf)) for s, buf in self._buffers.items() if buf]
                for buf in self._buffers.values():
                    buf.clear()
                closed = self._closed
            for stream, data in taken:
                for start in range(0, len(data), MAX_OUTPUT_CHUNK):
                    chunk = data[start : start + MAX_OUTPUT_CHUNK]
                    await self._send(stream, self._offsets[stream], chunk)
                    self._offsets[stream] += len(chunk)
                with self._lock:
                    self._buffered -= len(data)
                    self._lock.notify_all()
            if closed:
                with self._lock:
                    if self._buffered == 0:
                        return
                self._wake.set()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
