"""The kit's scripted switchboard: a WebSocket server on loopback that hands each
connection to the scenario running now, and the frames on it, decoded with `protocol`.

It decides nothing by itself: no welcome, no ack, no answer, except the heartbeats it is
told to send. Each connection is a Peer; every upgrade request is recorded (when, which
path, token and subprotocols), so scenarios can check how and how often the supervisor
under test connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from websockets import Subprotocol
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from protocol import codec, limits
from protocol.exceptions import FrameError
from protocol.messages import FromSupervisor, ServerHeartbeat

PATH = "/ws/supervisor"
#: Where a supervisor fetches the artifacts a run's inputs name (docs/protocol.md §5.1).
ARTIFACTS_PATH = "/api/v1/artifacts/"


@dataclass(frozen=True)
class Upgrade:
    """One upgrade request, as the supervisor under test sent it."""

    at: float  # time.monotonic()
    path: str
    authorization: str | None
    subprotocols: tuple[str, ...]


@dataclass(frozen=True)
class BadFrame:
    """A message from the supervisor that is not a valid one: why."""

    reason: str


@dataclass(frozen=True)
class Closed:
    """The connection ended: the close code the supervisor sent (1006: none, cut)."""

    code: int
    reason: str


Received = FromSupervisor | BadFrame | Closed


class PeerTimeout(Exception):
    """Nothing came from the supervisor in time."""


@dataclass(eq=False)
class Peer:
    """One connection from the supervisor under test."""

    ws: ServerConnection
    upgrade: Upgrade
    #: Called for each message as it is read, before a scenario sees it (the link's
    #: sequence ledger and automatic acks live there).
    observer: Callable[[FromSupervisor], Awaitable[None]] | None = None
    closed: Closed | None = None
    _inbox: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    _beats: asyncio.Task[None] | None = None

    async def read_loop(self) -> None:
        """Read until the connection ends, then record how it ended."""
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    self._inbox.put_nowait(BadFrame("a binary message (text only, §1)"))
                    continue
                try:
                    message = codec.decode_from_supervisor(raw)
                except FrameError as exc:
                    self._inbox.put_nowait(BadFrame(f"{exc.reason}: {raw[:200]!r}"))
                    continue
                if self.observer is not None:
                    await self.observer(message)
                self._inbox.put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            self.stop_heartbeats()
            code = self.ws.close_code if self.ws.close_code is not None else 1006
            self.closed = Closed(code, self.ws.close_reason or "")
            self._inbox.put_nowait(self.closed)

    async def next(self, timeout_s: float) -> Received:
        """The next thing that came (a message, a bad frame, or the end), or PeerTimeout."""
        if self.closed is not None and self._inbox.empty():
            return self.closed
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout_s)
        except TimeoutError:
            raise PeerTimeout(f"nothing from the supervisor for {timeout_s:g} s") from None

    async def send(self, message: msgspec.Struct) -> None:
        await self.send_text(codec.encode(message).decode())

    async def send_text(self, text: str) -> None:
        """Send one text message as is (scenarios send broken ones on purpose)."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(text)

    async def close(self, code: int, reason: str) -> None:
        self.stop_heartbeats()
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code, reason)

    def abort(self) -> None:
        """Cut the connection: no close frame, as a network failure would."""
        self.stop_heartbeats()
        self.ws.transport.abort()

    def start_heartbeats(self, interval_s: float) -> None:
        async def beat() -> None:
            while True:
                await asyncio.sleep(interval_s)
                await self.send(ServerHeartbeat(at=time.time()))

        self._beats = asyncio.create_task(beat())

    def stop_heartbeats(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            self._beats = None


class KitServer:
    """Listens on 127.0.0.1 (a free port) and queues each connection for `accept`."""

    def __init__(self) -> None:
        self.upgrades: list[Upgrade] = []
        self._pending: dict[ServerConnection, Upgrade] = {}
        self._incoming: asyncio.Queue[Peer] = asyncio.Queue()
        self._peers: set[Peer] = set()
        self._server: Server | None = None
        self.url = ""
        #: digest -> the bytes served for it at ARTIFACTS_PATH (a scenario may serve
        #: bytes of another digest, to see them refused).
        self.artifacts: dict[str, bytes] = {}
        #: (digest, the Authorization header) of each artifact request, in order.
        self.fetches: list[tuple[str, str | None]] = []

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._record,
            select_subprotocol=_select_subprotocol,
            max_size=limits.MAX_FRAME_BYTES,
            compression=None,
            ping_interval=None,  # the protocol's heartbeats are what is checked
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}{PATH}"

    async def stop(self) -> None:
        for peer in list(self._peers):
            peer.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def accept(self, timeout_s: float) -> Peer:
        """The next connection, or PeerTimeout."""
        try:
            return await asyncio.wait_for(self._incoming.get(), timeout_s)
        except TimeoutError:
            raise PeerTimeout(f"the supervisor did not connect within {timeout_s:g} s") from None

    def drop_all(self) -> None:
        """Cut every connection and forget any not yet accepted (before a fresh start)."""
        while not self._incoming.empty():
            self._incoming.get_nowait()
        for peer in list(self._peers):
            peer.abort()

    def _record(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith(ARTIFACTS_PATH):
            return self._artifact(request)
        offered = tuple(
            item.strip()
            for header in request.headers.get_all("Sec-WebSocket-Protocol")
            for item in header.split(",")
            if item.strip()
        )
        upgrade = Upgrade(
            at=time.monotonic(),
            path=request.path,
            authorization=request.headers.get("Authorization"),
            subprotocols=offered,
        )
        self.upgrades.append(upgrade)
        self._pending[connection] = upgrade
        return None

    def _artifact(self, request: Request) -> Response:
        """An artifact download: plain HTTP on the same port, as a switchboard serves it
        (never an upgrade: not recorded among them)."""
        digest = request.path.removeprefix(ARTIFACTS_PATH)
        authorization = request.headers.get("Authorization")
        self.fetches.append((digest, authorization))
        body = self.artifacts.get(digest)
        if authorization is None:
            return _response(401, "Unauthorized", b'{"message": "no token"}')
        if body is None:
            return _response(404, "Not Found", b'{"message": "no such artifact"}')
        return _response(200, "OK", body, "application/octet-stream")

    async def _handle(self, ws: ServerConnection) -> None:
        peer = Peer(ws, self._pending.pop(ws))
        self._peers.add(peer)
        self._incoming.put_nowait(peer)
        try:
            await peer.read_loop()
        finally:
            self._peers.discard(peer)


def _response(
    status: int, reason: str, body: bytes, media_type: str = "application/json"
) -> Response:
    headers = Headers({"Content-Type": media_type, "Content-Length": str(len(body))})
    return Response(status, reason, headers, body)


def _select_subprotocol(
    connection: ServerConnection, subprotocols: Sequence[Subprotocol]
) -> Subprotocol | None:
    # Accepted without it too: the handshake check reports its absence, which tells more
    # than a refused upgrade would.
    wanted = Subprotocol(limits.SUBPROTOCOL)
    return wanted if wanted in subprotocols else None
