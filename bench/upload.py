"""Output file uploads: one file sent as a supervisor sends a job's output files, and what
uploads do to the console output of other runs on the same host.

The uploader is the supervisor's own (`supervisor.uploads.upload_file`: hash the file, then
resumable `PUT /api/v1/uploads/{digest}` in 8 MiB pieces) with a host credential, in a
child process of its own (as a supervisor is), against the bed's real switchboard. Every
upload sends a fresh file (its first bytes changed), so the switchboard stores each one.

Measured:
- upload MB/s: file size / the `upload_file` call (hashing included, as the supervisor
  calls it: without a digest); CPU time per MB of the switchboard and of the uploading
  process meanwhile;
- floor: a local copy of the same bytes: read in the same pieces, sha256'd, written to a
  new file on the same file system. The least work any content-addressed copy of the file
  on this host does (the upload hashes twice and crosses loopback HTTP besides);
- console output alone: the output benchmark's one job streaming stdout through the
  protocol (bench.output), MB/s stored;
- console output while uploading: the same, with uploads running back to back in the
  uploader process from before the job starts until it has ended; alternated with the
  runs alone, so both see the same noise on a shared machine;
- console output while copying: the same with local copies of the file instead of
  uploads: what sharing the host's cores and disk costs without the switchboard.
MB = 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import uvloop

from bench.bed import Bed
from bench.fleet import BACKLOG_BYTES, CHUNK
from bench.output import _output_once
from bench.procs import child_channels, cpu_seconds, spawn_child, stop_child
from bench.stats import Summary
from supervisor.artifacts import switchboard_client
from supervisor.uploads import CHUNK as UPLOAD_PIECE
from supervisor.uploads import upload_file

#: The supervisor id the uploader's host credential is bound to.
HOST_ID = "bench-upload-host"


class Uploader:
    """The uploading host: a child process holding one file of `size` random bytes."""

    def __init__(self, url: str, token: str, work: Path, size: int) -> None:
        self.process, (self._conn,) = spawn_child("bench.upload", 1)
        self._conn.send((url, token, str(work), size))
        self._answer(120)

    def _answer(self, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"the uploader did not answer in {timeout_s:.0f} s")
        answer = self._conn.recv()
        if isinstance(answer, str) and answer.startswith("error:"):
            raise RuntimeError(f"uploader: {answer}")
        return answer

    def once(self, kind: str) -> dict[str, Any]:
        """One upload (or local copy): {"start", "end", "digest"} (monotonic times)."""
        self._conn.send(("once", kind))
        answer: dict[str, Any] = self._answer(300)
        return answer

    @contextlib.contextmanager
    def looping(self, kind: str) -> Iterator[list[dict[str, Any]]]:
        """Uploads (or copies) back to back while the body runs; yields a list that gets
        each one's {"start", "end", "digest"} once it has stopped."""
        self._conn.send(("loop", kind))
        self._answer(60)  # the first one has begun
        done: list[dict[str, Any]] = []
        try:
            yield done
        finally:
            self._conn.send("stop")
            done.extend(self._answer(300))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("quit")
        stop_child(self.process)
        self._conn.close()


# --- in the child ------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    (conn,) = child_channels(argv)
    url, token, work, size = conn.recv()
    try:
        uvloop.run(_serve(conn, url, token, Path(work), size))
    except Exception as exc:
        conn.send(f"error: {exc!r}")
        raise


async def _serve(conn: Connection, url: str, token: str, work: Path, size: int) -> None:
    source = work / "output.bin"
    with source.open("wb") as out:
        left = size
        while left:
            out.write(os.urandom(min(left, 1 << 20)))
            left -= min(left, 1 << 20)
    async with switchboard_client(url, token) as client:
        files = _Files(source, work, client, url)
        conn.send("ready")
        while (command := conn.recv()) != "quit":
            if command == "stop":
                continue  # a loop that failed has already answered
            try:
                if command[0] == "once":
                    conn.send(await files.one(command[1]))
                else:
                    conn.send(await _loop(conn, files, command[1]))
            except Exception as exc:
                conn.send(f"error: {exc!r}")


class _Files:
    def __init__(self, source: Path, work: Path, client: httpx.AsyncClient, url: str) -> None:
        self.source = source
        self.work = work
        self.client = client
        self.url = url
        self.count = 0

    async def one(self, kind: str) -> dict[str, Any]:
        # Fresh bytes each time: an upload of bytes already stored sends nothing.
        self.count += 1
        with self.source.open("r+b") as file:
            file.write(struct.pack(">QQ", os.getpid(), self.count))
        start = time.monotonic()
        if kind == "upload":
            digest = await upload_file(self.client, self.url, None, self.source)
        else:
            digest = await asyncio.to_thread(local_copy, self.source, self.work / "copy.bin")
        return {"start": start, "end": time.monotonic(), "digest": digest}


async def _loop(conn: Connection, files: _Files, kind: str) -> list[dict[str, Any]]:
    done = []
    while True:
        task = asyncio.create_task(files.one(kind))
        if not done:
            await asyncio.sleep(0)  # it has begun
            conn.send("started")
        done.append(await task)
        if conn.poll():
            if (command := conn.recv()) != "stop":
                raise RuntimeError(f"unexpected {command!r} while looping")
            return done


def local_copy(source: Path, target: Path) -> str:
    """The floor: read `source` in the uploader's pieces, hash and write them to `target`
    (then removed); returns the digest."""
    hasher = hashlib.sha256()
    with source.open("rb") as file, target.open("wb", buffering=0) as out:
        while piece := file.read(UPLOAD_PIECE):
            hasher.update(piece)
            view = memoryview(piece)
            while view:
                view = view[out.write(view) or 0 :]
    target.unlink()
    return "sha256:" + hasher.hexdigest()


# --- the measurements --------------------------------------------------------------------


def _rate(size: int, one: dict[str, Any]) -> float:
    return size / (one["end"] - one["start"]) / 1e6


def _forget(bed: Bed, done: list[dict[str, Any]]) -> None:
    """Delete the uploaded artifacts (keeps the disk small); each must have been stored."""
    for digest in {one["digest"] for one in done}:
        bed.api.call("DELETE", f"/api/v1/artifacts/{digest}")


def _output_during(
    bed: Bed, uploader: Uploader, kind: str, output_size: int, backlog: int
) -> tuple[float, list[dict[str, Any]]]:
    with uploader.looping(kind) as done:
        began = time.monotonic()
        output = _output_once(bed, output_size, backlog)["output_stored_mb_s"]
        ended = time.monotonic()
    if not (done and done[0]["start"] <= began and done[-1]["end"] >= ended):
        raise RuntimeError(f"the {kind}s did not cover the console output run")
    return output, done


def measure_upload(
    bed: Bed, size: int, output_size: int, reps: int, backlog: int = BACKLOG_BYTES
) -> dict[str, Summary]:
    """`size`: bytes of the uploaded file; `output_size`: bytes of each console output
    run; `backlog`: unacknowledged output bytes the writing supervisor allows itself."""
    token = bed.switchboard.create_token("supervisor", HOST_ID)
    values: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        values.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="sb-bench-upload-") as work:
        uploader = Uploader(bed.switchboard.url, token, Path(work), size)
        try:
            _forget(bed, [uploader.once("upload")])  # warm-up: connection, code paths
            _output_once(bed, min(output_size, 4 * len(CHUNK)), backlog)
            for _ in range(reps):
                cpu = cpu_seconds(bed.pid), cpu_seconds(uploader.process.pid)
                one = uploader.once("upload")
                note("upload_mb_s", _rate(size, one))
                mb = size / 1e6
                note("upload_switchboard_cpu_ms_per_mb", (cpu_seconds(bed.pid) - cpu[0]) / mb * 1e3)
                host_cpu = cpu_seconds(uploader.process.pid) - cpu[1]
                note("upload_host_cpu_ms_per_mb", host_cpu / mb * 1e3)
                _forget(bed, [one])
                note("floor_local_copy_mb_s", _rate(size, uploader.once("copy")))
            for _ in range(reps):
                alone = _output_once(bed, output_size, backlog)["output_stored_mb_s"]
                note("upload_output_alone_mb_s", alone)
                during, done = _output_during(bed, uploader, "upload", output_size, backlog)
                note("upload_output_during_mb_s", during)
                note("upload_during_output_mb_s", sum(_rate(size, one) for one in done) / len(done))
                _forget(bed, done)
                copying, _ = _output_during(bed, uploader, "copy", output_size, backlog)
                note("upload_output_during_copy_mb_s", copying)
        finally:
            uploader.close()
    return {k: Summary.of(v, "ms" if "cpu" in k else "MB/s") for k, v in values.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
