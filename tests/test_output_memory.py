"""Reading a huge output costs the switchboard constant memory: four viewers download a
100 MB stdout at once, and the server's resident memory (from /proc, of the real process)
grows by far less than the output's size."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from protocol.limits import MAX_OUTPUT_CHUNK
from protocol.messages import Hello, JobStateChanged, Output
from protocol.spec import JobSpec, NoopBackend
from protocol.state import Phase
from switchboard.config import Settings
from switchboard.store.sqlite import SQLiteStore
from tests.harness import Switchboard, scaled

pytestmark = pytest.mark.process

OUTPUT_BYTES = 100 * 1024 * 1024
VIEWERS = 4
JOB_ID = "talkative"


def _pattern(offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of an output whose 64-byte lines say where they are
    (a misplaced byte shows)."""
    first, last = offset // 64, (offset + size + 63) // 64
    text = "".join(f"{n * 64:012d} {'x' * 50}\n" for n in range(first, last)).encode()
    return text[offset - first * 64 :][:size]


async def _seed(path: Path) -> None:
    """A data dir holding one ended job that wrote OUTPUT_BYTES to stdout, stored the way a
    supervisor's events are."""
    store = SQLiteStore(path)
    await store.open()
    try:
        hello = Hello(supervisor_id="host", name="host", versions=["1.0"], backends=["noop"])
        await store.supervisor_connected(hello)
        await store.create_job(JOB_ID, JobSpec(name="talkative", backend=NoopBackend()))
        await store.assign([(JOB_ID, "host")])
        seq = 0
        batch: list = []
        for offset in range(0, OUTPUT_BYTES, MAX_OUTPUT_CHUNK):
            seq += 1
            data = _pattern(offset, min(MAX_OUTPUT_CHUNK, OUTPUT_BYTES - offset))
            batch.append(Output(seq, JOB_ID, 1, "stdout", offset, data))
            if len(batch) == 16:
                await store.apply_events("host", batch)
                batch = []
        for phase in (Phase.RUNNING, Phase.SUCCEEDED):
            seq += 1
            batch.append(JobStateChanged(seq, JOB_ID, 1, phase))
        await store.apply_events("host", batch)
        await store.forget_connections()
    finally:
        await store.close()


def _rss(pid: int) -> int:
    """Resident memory of a process, in bytes (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def big_output(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("memory") / "data"
    data_dir.mkdir()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _seed(Settings(data_dir=data_dir).database_path)).result()
    server = Switchboard(data_dir)
    yield server
    server.stop()


def test_four_viewers_of_a_100_mb_output_cost_constant_memory(big_output):
    pid = big_output.process.proc.pid
    path = f"/api/v1/jobs/{JOB_ID}/output"
    with big_output.client() as client:
        # Warm up the route (imports, threads, caches), then take the floor.
        first = client.get(path, params={"end": 1024 * 1024})
        assert first.status_code == 200 and first.content == _pattern(0, 1024 * 1024)
        start, end = 3 * MAX_OUTPUT_CHUNK + 5, 4_000_000  # across stored chunks and reads
        middle = client.get(path, params={"start": start, "end": end})
        assert middle.content == _pattern(start, end - start)
    floor = _rss(pid)

    received: list[int] = []
    errors: list[BaseException] = []

    def view() -> None:
        try:
            size = 0
            with big_output.client() as client, client.stream("GET", path) as response:
                assert response.status_code == 200
                for chunk in response.iter_raw():
                    if size == 0:
                        assert chunk.startswith(_pattern(0, 64))
                    size += len(chunk)
            received.append(size)
        except BaseException as exc:
            errors.append(exc)

    viewers = [threading.Thread(target=view) for _ in range(VIEWERS)]
    for viewer in viewers:
        viewer.start()
    peak = floor
    deadline = time.monotonic() + scaled(300)
    while any(v.is_alive() for v in viewers):
        assert time.monotonic() < deadline, "the downloads did not finish"
        peak = max(peak, _rss(pid))
        time.sleep(0.01)
    assert not errors, errors
    assert received == [OUTPUT_BYTES] * VIEWERS
    growth = peak - floor
    print(f"rss floor {floor / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, +{growth / 2**20:.1f}")
    # Holding the output in memory even once would cost OUTPUT_BYTES; four viewers, four
    # times that. Streaming, growth is a few read buffers per viewer.
    assert growth < OUTPUT_BYTES / 4, f"grew by {growth / 2**20:.0f} MiB"
