"""Writing a request body to disk without making the event loop wait on the disk.

A write to the page cache is quick until the kernel throttles a writer whose dirty pages
pile up (a slow or full disk): then it blocks, and on the event loop it would stall every
supervisor and request the switchboard serves. So a body is written behind: each chunk
joins a buffer that a worker thread drains as fast as the disk takes it (bytes reach the
file at once when the disk keeps up; under load, chunks gather into larger writes: one
thread hop per batch, not per network read). Only when MAX_PENDING bytes wait does the
body's reader wait for the disk: memory per upload stays bounded.
"""

from __future__ import annotations

import asyncio
from typing import Any, BinaryIO

#: Bytes of one body that may wait for the disk before its reader waits too.
MAX_PENDING = 1024 * 1024


class ThreadedWriter:
    """Appends to `out` from a worker thread, updating `hasher` (a hashlib object) with
    the same bytes in the same order. `flush` (or `discard`) before closing `out`."""

    def __init__(self, out: BinaryIO, hasher: Any = None) -> None:
        self._out = out
        self._hasher = hasher
        self._pending = bytearray()
        self._draining: asyncio.Task[None] | None = None

    async def write(self, chunk: bytes) -> None:
        draining = self._draining
        if draining is not None and draining.done():
            draining.result()  # a write that failed: its error, here, before more bytes
        self._pending += chunk
        if draining is None or draining.done():
            self._draining = asyncio.ensure_future(self._drain())
            self._draining.add_done_callback(_noted)
        if len(self._pending) >= MAX_PENDING:
            await self.flush()

    async def flush(self) -> None:
        """Until every byte given is written (a write's error is raised here)."""
        if self._draining is not None:
            await asyncio.shield(self._draining)

    async def discard(self) -> None:
        """Forget the bytes not yet written; wait for the write under way, if any."""
        self._pending.clear()
        await self.flush()

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = bytes(self._pending), bytearray()
            await asyncio.to_thread(self._write_all, batch)

    def _write_all(self, data: bytes) -> None:
        if self._hasher is not None:
            self._hasher.update(data)
        view = memoryview(data)
        while view:  # a raw (unbuffered) write may take less than it is given
            view = view[self._out.write(view) or 0 :]


def _noted(task: asyncio.Task[None]) -> None:
    # Raised to whoever flushes; noted here so a writer abandoned mid-way (its request
    # cancelled) leaves no "exception never retrieved" behind.
    if not task.cancelled():
        task.exception()
