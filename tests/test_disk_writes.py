"""Request bodies reach the disk from worker threads, a batch at a time: the bytes land
whole and in order, hashed as written, and no write runs on the event loop's thread (a
disk the kernel throttles would stall every peer the loop serves)."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest

from switchboard.disk_writes import MAX_PENDING, ThreadedWriter

pytestmark = pytest.mark.unit


class ThreadNoting(io.BytesIO):
    """An in-memory file noting which thread each write ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def write(self, data) -> int:  # type: ignore[override]
        self.threads.add(threading.get_ident())
        return super().write(data)


async def test_batches_are_written_whole_in_order_off_the_loop(tmp_path):
    chunks = [bytes([i % 251]) * (64 * 1024 + i) for i in range(40)]  # ~2.6 MB
    out = ThreadNoting()
    hasher = hashlib.sha256()
    writer = ThreadedWriter(out, hasher)
    for chunk in chunks:
        await writer.write(chunk)
    assert out.getvalue() == b"".join(chunks)[: len(out.getvalue())]
    # Written as it came, never more than MAX_PENDING behind.
    assert len(out.getvalue()) >= sum(map(len, chunks)) - MAX_PENDING
    await writer.flush()
    assert out.getvalue() == b"".join(chunks)
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert threading.get_ident() not in out.threads and out.threads

    # A real file, unbuffered, as the uploads use it.
    path = tmp_path / "f"
    with path.open("ab", buffering=0) as raw:
        writer = ThreadedWriter(raw)
        await writer.write(b"kept ")
        await writer.flush()
        await writer.discard()
        await writer.write(b"more")
        await writer.flush()
    assert path.read_bytes() == b"kept more"


async def test_a_failed_write_is_raised_never_lost():
    class Full(io.BytesIO):
        def write(self, data) -> int:  # type: ignore[override]
            raise OSError(28, "No space left on device")

    writer = ThreadedWriter(Full())
    await writer.write(b"x")
    with pytest.raises(OSError, match="No space"):
        await writer.flush()
    with pytest.raises(OSError, match="No space"):
        await writer.write(b"y")
