"""OutputPump: thread writes become bounded, contiguous chunks; backpressure holds a
writer thread while sending is slow; a stop releases it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from protocol.limits import MAX_OUTPUT_CHUNK
from supervisor.output import OutputPump

pytestmark = pytest.mark.unit


async def test_chunks_are_bounded_contiguous_and_complete():
    chunks: list[tuple[str, int, bytes]] = []

    async def send(stream, offset, data):
        chunks.append((stream, offset, data))

    pump = OutputPump(send)
    payload = bytes(range(256)) * 5000  # 1.28 MB
    writer = threading.Thread(
        target=lambda: [
            pump.write("stdout", payload[i : i + 4096]) for i in range(0, len(payload), 4096)
        ]
    )
    writer.start()
    await asyncio.to_thread(writer.join)
    pump.write("stderr", b"err")
    await pump.close()
    out = [c for c in chunks if c[0] == "stdout"]
    assert all(len(data) <= MAX_OUTPUT_CHUNK for _, _, data in out)
    offset = 0
    for _, start, data in out:
        assert start == offset
        offset += len(data)
    assert b"".join(d for _, _, d in out) == payload
    assert len(out) < len(payload) // 4096  # small writes were gathered, not sent one by one
    assert [c for c in chunks if c[0] == "stderr"] == [("stderr", 0, b"err")]
    assert pump.offsets["stdout"] == len(payload)


async def test_slow_sending_blocks_the_writer_thread_and_a_stop_releases_it():
    gate = asyncio.Event()

    async def send(stream, offset, data):
        await gate.wait()  # the link is stalled

    stop = threading.Event()
    pump = OutputPump(send, high_water=64 * 1024, stop=stop)
    wrote = threading.Event()

    def writer():
        for _ in range(64):
            pump.write("stdout", b"x" * 4096)
        wrote.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    await asyncio.sleep(0.3)
    assert not wrote.is_set()  # held back: 256 KiB can't all be buffered
    stop.set()
    await asyncio.to_thread(wrote.wait, 5)
    assert wrote.is_set()
    gate.set()
    await pump.close()
