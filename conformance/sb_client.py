"""The kit's scripted supervisor: one WebSocket to the switchboard under test.

It sends what a scenario tells it (encoded by `protocol.codec`, or raw frames the reference
encoder never would), and keeps everything the switchboard sends, decoded, for the
scenario to look through: acks (the highest seq acknowledged and every problem named),
start_job, stop_job, heartbeats, the protocol_error and the close. Like any supervisor it
sends heartbeats and answers status_request on its own, unless told to stay silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocol import codec, limits
from protocol.messages import (
    Ack,
    EventProblem,
    Heartbeat,
    HeldRun,
    StatusReply,
    StatusRequest,
    SupervisorMessage,
)


class Refused(Exception):
    """The switchboard answered the upgrade request with an HTTP error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Unreadable:
    """A frame from the switchboard that is not a valid message (kept for the report)."""

    raw: str | bytes
    error: str


@dataclass(frozen=True)
class Received:
    message: object
    #: The frame as it came (a scenario may check what the encoder left out).
    raw: str | bytes


@dataclass
class SupervisorSocket:
    """One connection, read in the background from the moment it is open."""

    ws: ClientConnection
    received: list[Received] = field(default_factory=list)
    #: Highest `ack.seq` seen, and every problem those acks named.
    acked: int = -1
    problems: list[EventProblem] = field(default_factory=list)
    #: Runs this supervisor says it holds, for its answers to status_request.
    held: dict[tuple[str, int], HeldRun] = field(default_factory=dict)
    #: Keep status_request unanswered (in `pending_status`) until `release_status`.
    hold_status: bool = False
    pending_status: list[StatusRequest] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    closed_at: float | None = None
    _taken: set[int] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._read()))

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                self._got(frame)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason or ""
            self.closed_at = time.monotonic()
            self._changed.set()

    def _got(self, frame: str | bytes) -> None:
        message: object
        try:
            message = codec.decode_from_switchboard(frame)
        except Exception as exc:  # any failure to decode is evidence, not a crash
            message = Unreadable(frame, str(exc))
        self.received.append(Received(message, frame))
        if isinstance(message, Ack):
            self.acked = max(self.acked, message.seq)
            self.problems.extend(message.problems)
        elif isinstance(message, StatusRequest):
            if self.hold_status:
                self.pending_status.append(message)
            else:
                self._tasks.append(asyncio.create_task(self._status(message)))
        self._changed.set()

    async def _status(self, request: StatusRequest) -> None:
        reply = StatusReply(request_id=request.request_id, runs=list(self.held.values()))
        await self._send_quietly(codec.encode(reply))

    async def release_status(self) -> None:
        """Answer the status_request held back, and those to come at once."""
        self.hold_status = False
        while self.pending_status:
            await self._status(self.pending_status.pop(0))

    def keep_alive(self, interval_s: float) -> None:
        """Send a heartbeat every `interval_s`, as a supervisor must (docs/protocol.md §8)."""
        self._tasks.append(asyncio.create_task(self._beat(interval_s)))

    async def _beat(self, interval_s: float) -> None:
        while self.close_code is None:
            await asyncio.sleep(interval_s)
            await self._send_quietly(codec.encode(Heartbeat(at=time.time())))

    async def _send_quietly(self, frame: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(frame.decode())

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    async def send(self, message: SupervisorMessage) -> None:
        """One message as a text frame (a closed connection swallows it, as TCP would)."""
        await self._send_quietly(codec.encode(message))

    async def send_many(self, messages: list[SupervisorMessage]) -> None:
        for message in messages:
            await self.send(message)

    async def send_raw(self, frame: str | bytes) -> None:
        """A frame as given: `str` goes as a text frame, `bytes` as a binary one."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(frame)

    async def expect(
        self, wanted: Callable[[Any], bool], within: float, after: int = 0
    ) -> Any | None:
        """The first message not taken before that `wanted` accepts (of those received
        after the first `after`), waiting up to `within` seconds for it; None if none came
        (or the connection closed)."""
        deadline = time.monotonic() + within
        while True:
            for index, item in enumerate(self.received):
                if index >= after and index not in self._taken and wanted(item.message):
                    self._taken.add(index)
                    return item.message
            remaining = deadline - time.monotonic()
            if self.closed or remaining <= 0:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_ack(self, seq: int, within: float) -> bool:
        """True once an ack covers `seq`."""
        deadline = time.monotonic() + within
        while self.acked < seq:
            remaining = deadline - time.monotonic()
            if self.closed or remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    async def wait_closed(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def problems_of(self, seq: int) -> list[str]:
        """The codes the acks named for event `seq`."""
        return [str(p.code) for p in self.problems if p.seq == seq]

    def of_type(self, kind: type) -> list[Any]:
        return [r.message for r in self.received if isinstance(r.message, kind)]

    async def close(self) -> None:
        """Close politely (1000) and stop the background tasks."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        await self._stop_tasks()

    async def cut(self) -> None:
        """Drop the TCP connection with no closing handshake, as a network cut would."""
        self.ws.transport.abort()
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def open_socket(
    url: str,
    token: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    open_timeout: float = 10.0,
) -> SupervisorSocket:
    """Upgrade to the supervisor endpoint with `token` and the protocol's subprotocol.
    Raises Refused when the switchboard answers with an HTTP error instead."""
    # `ssl` only for wss: the client refuses a context for a plain ws URL.
    tls: dict[str, Any] = {"ssl": ssl_context} if ssl_context is not None else {}
    try:
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[websockets.Subprotocol(limits.SUBPROTOCOL)],
            max_size=limits.MAX_FRAME_BYTES,
            compression=None,
            open_timeout=open_timeout,
            ping_interval=None,
            **tls,
        )
    except InvalidStatus as exc:
        raise Refused(exc.response.status_code, bytes(exc.response.body or b"")) from None
    socket = SupervisorSocket(ws)
    socket.start()
    return socket


def raw_json(item: Received) -> dict[str, Any]:
    """The frame's JSON object as sent (fields the encoder left out are absent)."""
    value = msgspec.json.decode(item.raw)
    return value if isinstance(value, dict) else {}
