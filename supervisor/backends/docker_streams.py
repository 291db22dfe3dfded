"""Container output for the docker backend: the attach stream, and log replay.

Why a module of its own: this is the part that runs on worker threads and blocks on sockets.
A live run's output comes from the attach stream, opened before the container starts, so no
byte is missed and a slow switchboard slows the program instead of growing a buffer. A
re-adopted run's output is replayed from the engine's `local` log, from byte 0, then checked
against what was sent once the container has ended. Both are Docker's multiplexed format,
split by demux(). Every connection is a Pipe the event loop can cut (abandon) at any time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import requests

from protocol.messages import Stream
from supervisor.backends.base import RunContext

log = logging.getLogger(__name__)

#: How much a stream reader asks the socket for at once.
READ_SIZE = 256 * 1024

_FRAME_HEADER = struct.Struct(">BxxxL")
_FRAME_STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}


@dataclass
class Ended:
    """What a container's reader thread saw: the exit status (None: it stopped reading
    before the end) and notes for the outcome's message."""

    exit_code: int | None
    notes: list[str] = field(default_factory=list)


class _Abandoned(Exception):
    """A reader's connection was cut on purpose: nobody wants the rest."""


class Pipe:
    """A blocking connection a worker thread reads (an attach socket or a logs response),
    which another thread may cut (the run is abandoned, or the backend closes)."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None]) -> None:
        self._read = read
        self._close = close
        self.abandoned = False

    def read(self, size: int) -> bytes:
        """Up to `size` bytes, b"" at the end; raises _Abandoned once abandoned."""
        try:
            data = self._read(size)
        except Exception:
            if self.abandoned:
                raise _Abandoned from None
            raise
        if self.abandoned:
            raise _Abandoned
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._close()

    def abandon(self) -> None:
        self.abandoned = True
        self.close()


class ContainerOutput:
    """Copies containers' output to their runs (each call blocks: worker threads only).

    `engine` gives the backend's connected client; `live` is the backend's set of open
    pipes, which it abandons when it closes.
    """

    def __init__(self, engine: Callable[[], docker.APIClient], live: set[Pipe]) -> None:
        self._engine = engine
        self._pipes = live

    def copy_attached(self, ctx: RunContext, cid: str, pipe: Pipe, go: threading.Event) -> Ended:
        """Once `go` is set, copy the attach stream to the run's output until the program's
        stdout and stderr close, then wait for the container to end (worker thread)."""
        go.wait()
        try:
            demux(pipe.read, ctx.write)
        except (_Abandoned, RuntimeError, OSError):
            if pipe.abandoned:
                return Ended(None)  # nobody waits for this run here (or it never started)
            raise
        finally:
            pipe.close()
        return Ended(self._engine().wait(cid, timeout=None)["StatusCode"])

    def replay(self, ctx: RunContext, cid: str, pipes: list[Pipe]) -> Ended:
        """Send a re-adopted container's output from the engine's log, from the first byte:
        follow it while the container runs, then read what the follow missed (worker
        thread). Returns notes for the outcome's message (the log disagreed)."""
        try:
            return self._replay_log(ctx, cid, pipes)
        except (_Abandoned, RuntimeError):
            if any(p.abandoned for p in pipes):
                return Ended(None)
            raise

    def _replay_log(self, ctx: RunContext, cid: str, pipes: list[Pipe]) -> Ended:
        api = self._engine()
        sent: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        digests = {stream: hashlib.sha256() for stream in sent}

        def emit(stream: Stream, data: bytes) -> None:
            ctx.write(stream, data)
            digests[stream].update(data)
            sent[stream] += len(data)

        while True:
            running = api.inspect_container(cid)["State"].get("Running", False)
            self._read_log(cid, follow=running, skip=dict(sent), emit=emit, pipes=pipes)
            if not running or not api.inspect_container(cid)["State"].get("Running", False):
                break
            time.sleep(0.1)  # the follow ended early while the container runs: again
        exit_code = api.wait(cid, timeout=None)["StatusCode"]
        # The engine's follow can end a little before the end of the log: read it whole
        # once more, check it starts with what was sent, and send the rest.
        before = dict(sent)
        sent_digests = {stream: digests[stream].digest() for stream in sent}
        check = {stream: hashlib.sha256() for stream in sent}
        seen: dict[Stream, int] = {"stdout": 0, "stderr": 0}

        def finish(stream: Stream, data: bytes) -> None:
            old = min(len(data), max(0, before[stream] - seen[stream]))  # already sent
            check[stream].update(data[:old])
            seen[stream] += len(data)
            if old < len(data):
                emit(stream, data[old:])

        self._read_log(cid, follow=False, skip={}, emit=finish, pipes=pipes)
        notes = []
        for stream in before:
            if seen[stream] < before[stream] or check[stream].digest() != sent_digests[stream]:
                log.error(
                    "run %s#%d: the engine's log of %s no longer matches what was sent "
                    "(rotated?); the replayed output may be wrong",
                    ctx.run.job_id,
                    ctx.run.attempt,
                    stream,
                )
                notes.append(f"the engine's log of {stream} changed while it was replayed")
        return Ended(exit_code, notes)

    def _read_log(
        self,
        cid: str,
        *,
        follow: bool,
        skip: dict[Stream, int],
        emit: Callable[[Stream, bytes], None],
        pipes: list[Pipe],
    ) -> None:
        """Read a container's log (both streams) from the start, dropping the first
        `skip[stream]` bytes of each (worker thread)."""
        api = self._engine()
        url = f"{api.base_url}/v{api.api_version}/containers/{cid}/logs"
        response = api.get(
            url,
            params={"stdout": 1, "stderr": 1, "follow": int(follow)},
            stream=True,
            timeout=None,
        )
        try:
            response.raise_for_status()
        except requests.HTTPError as exc:
            raise docker.errors.create_api_error_from_http_exception(exc) from None
        chunks = response.iter_content(READ_SIZE)
        pipe = Pipe(lambda _n: next(chunks, b""), response.close)
        pipes.append(pipe)
        self._pipes.add(pipe)
        todo = dict(skip)

        def write(stream: Stream, data: bytes) -> None:
            drop = min(todo.get(stream, 0), len(data))
            if drop:
                todo[stream] -= drop
                data = data[drop:]
            if data:
                emit(stream, data)

        try:
            demux(pipe.read, write)
        except (OSError, requests.RequestException):
            if pipe.abandoned:
                raise _Abandoned from None
            raise
        finally:
            self._pipes.discard(pipe)
            response.close()


def socket_pipe(sock: Any) -> Pipe:
    """A Pipe over an attach socket (a SocketIO, or a socket), blocking reads."""
    raw = getattr(sock, "_sock", sock)
    with contextlib.suppress(AttributeError, OSError):
        raw.settimeout(None)  # the client's request timeout must not end a quiet program
    read = sock.read if hasattr(sock, "read") else raw.recv

    def close() -> None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    return Pipe(read, close)


def demux(read: Callable[[int], bytes], write: Callable[[Stream, bytes], None]) -> None:
    """Split Docker's multiplexed stream (8-byte header: stream, 0, 0, 0, big-endian length)
    into stdout and stderr writes until EOF. Payloads are passed on as they arrive, not a
    frame at a time; consecutive bytes of one stream in one read are written together."""
    header = bytearray()
    stream: Stream | None = None
    left = 0  # payload bytes of the current frame still to come
    while True:
        data = read(READ_SIZE)
        if not data:
            return
        view = memoryview(data)
        pos = 0
        pending: dict[Stream, list[bytes]] = {}
        while pos < len(view):
            if left == 0:
                need = _FRAME_HEADER.size - len(header)
                header += view[pos : pos + need]
                pos += min(need, len(view) - pos)
                if len(header) < _FRAME_HEADER.size:
                    break
                kind, left = _FRAME_HEADER.unpack(header)
                header.clear()
                stream = _FRAME_STREAMS.get(kind)
                continue
            take = min(left, len(view) - pos)
            if stream is not None:
                pending.setdefault(stream, []).append(view[pos : pos + take].tobytes())
            pos += take
            left -= take
        for out, parts in pending.items():
            write(out, b"".join(parts))
