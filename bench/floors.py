"""Floors: the same kind of work done by the bare libraries, measured in the same run.

- a bare `websockets` server (uvloop, in its own process, like the switchboard): echo
  round trips of a heartbeat-sized frame from a client in this process; one-way transfer
  of output-sized frames (the JSON of a MAX_OUTPUT_CHUNK Output event); and what idle
  connections cost it (RSS per connection, CPU per heartbeat-sized frame echoed);
- SQLite with the store's schema (tables, indexes, triggers) and PRAGMAs (WAL,
  synchronous=NORMAL): job rows inserted in transactions of 100, output chunks inserted
  in transactions of 4 (1 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import uvloop
import websockets
from websockets.asyncio.server import ServerConnection, serve

from bench.fleet import CHUNK
from bench.procs import child_channels, raise_fd_limit, spawn_child, stop_child
from protocol import codec, limits
from protocol.messages import Heartbeat, Output
from protocol.spec import JobSpec, NoopBackend
from switchboard.store.migrations import apply_schema

SYNC = b"sync"
#: Frames longer than this are counted, not echoed.
ECHO_MAX = 4096

# --- the bare WebSocket server -----------------------------------------------------------


class RawServer:
    """A bare `websockets` server on loopback in a child process. It echoes small frames,
    counts the bytes of big ones, and answers `sync` with the bytes counted so far (so a
    sender knows everything before it was read)."""

    def __init__(self) -> None:
        self.process, (self._conn,) = spawn_child("bench.floors", 1)
        if not self._conn.poll(60):
            raise TimeoutError("the bare WebSocket server did not start")
        port = self._conn.recv()
        self.url = f"ws://127.0.0.1:{port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        stop_child(self.process)
        self._conn.close()


def main(argv: list[str]) -> None:
    (conn,) = child_channels(argv)
    raise_fd_limit()
    uvloop.run(_serve(conn))


async def _serve(conn: Connection) -> None:
    async def handler(ws: ServerConnection) -> None:
        received = 0
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                frame = await ws.recv(decode=False)
                if frame == SYNC:
                    await ws.send(str(received))
                elif len(frame) <= ECHO_MAX:
                    await ws.send(frame, text=True)
                else:
                    received += len(frame)

    async with serve(
        handler,
        "127.0.0.1",
        0,
        compression=None,
        ping_interval=None,
        max_size=limits.MAX_FRAME_BYTES,
        backlog=2048,  # as the switchboard's
    ) as server:
        conn.send(next(iter(server.sockets)).getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def _connect(url: str) -> websockets.ClientConnection:
    return await websockets.connect(
        url, compression=None, ping_interval=None, max_size=limits.MAX_FRAME_BYTES
    )


async def echo_round_trips(url: str, count: int, warmup: int = 50) -> list[float]:
    """Round trips (ms) of a heartbeat frame, one in flight at a time."""
    frame = codec.encode(Heartbeat(at=time.time()))
    times = []
    async with await _connect(url) as ws:
        for i in range(warmup + count):
            started = time.perf_counter()
            await ws.send(frame, text=True)
            await ws.recv(decode=False)
            if i >= warmup:
                times.append((time.perf_counter() - started) * 1000)
    return times


async def stream_rate(url: str, total_bytes: int) -> float:
    """MB/s (10^6 bytes of output data) carried by Output-event frames sent back to back."""
    frame = codec.encode(Output(1, "bench", 1, "stdout", 0, CHUNK))
    count = max(1, total_bytes // len(CHUNK))
    async with await _connect(url) as ws:
        await ws.send(frame, text=True)  # warm up
        await ws.send(SYNC, text=True)
        await ws.recv()
        started = time.perf_counter()
        for _ in range(count):
            await ws.send(frame, text=True)
        await ws.send(SYNC, text=True)
        await ws.recv()
        took = time.perf_counter() - started
    return count * len(CHUNK) / took / 1e6


# --- SQLite ------------------------------------------------------------------------------

#: The store's insert of a job (switchboard/store/sqlite_jobs.py).
_INSERT_JOB = (
    "INSERT INTO jobs (id, name, spec, phase, priority, labels, resources, concurrency_key,"
    " timeout_s, queued_at, queue_deadline, reason, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_OUTPUT = "INSERT INTO output (job_id, attempt, stream, offset, data) VALUES (?, ?, ?, ?, ?)"


def _database(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")  # as switchboard/store/sqlite.py
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    apply_schema(conn)
    return conn


def sqlite_job_inserts(rows: int, per_transaction: int = 100) -> float:
    """Job rows inserted per second, `per_transaction` rows per committed transaction."""
    spec = msgspec.json.encode(JobSpec(name="noop", backend=NoopBackend()))
    with tempfile.TemporaryDirectory(prefix="sb-bench-sqlite-") as tmp:
        conn = _database(Path(tmp) / "floor.sqlite3")
        try:
            started = time.perf_counter()
            for first in range(0, rows, per_transaction):
                now = time.time()
                batch = [
                    # id, name, spec, phase, priority, labels, resources, concurrency_key,
                    # timeout_s, queued_at, queue_deadline, reason, created_at, updated_at
                    (
                        f"{n:016x}",
                        "noop",
                        spec,
                        "queued",
                        0,
                        "{}",
                        "{}",
                        None,
                        None,
                        now,
                        None,
                        None,
                        now,
                        now,
                    )
                    for n in range(first, min(rows, first + per_transaction))
                ]
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT_JOB, batch)
                conn.execute("COMMIT")
            return rows / (time.perf_counter() - started)
        finally:
            conn.close()


def sqlite_output_inserts(total_bytes: int, per_transaction: int = 4) -> float:
    """MB/s of MAX_OUTPUT_CHUNK output rows, `per_transaction` chunks per transaction."""
    count = max(per_transaction, total_bytes // len(CHUNK))
    with tempfile.TemporaryDirectory(prefix="sb-bench-sqlite-") as tmp:
        conn = _database(Path(tmp) / "floor.sqlite3")
        try:
            started = time.perf_counter()
            for first in range(0, count, per_transaction):
                conn.execute("BEGIN IMMEDIATE")
                for n in range(first, min(count, first + per_transaction)):
                    conn.execute(_INSERT_OUTPUT, ("job", 1, "stdout", n * len(CHUNK), CHUNK))
                conn.execute("COMMIT")
            return count * len(CHUNK) / (time.perf_counter() - started) / 1e6
        finally:
            conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
