"""Limits on the switchboard's HTTP connections, enforced before a request reaches the app.

uvicorn's httptools protocol reads a request head of any size, waits for it and for a body
without a deadline, and caps nothing but requests in flight (`limit_concurrency`, which
also answers 503 to WebSocket upgrades: it would lock supervisors out). LimitedHttpProtocol
is that protocol with the missing limits (docs/server.md):

- a request head (request line and header lines) larger than `max_header_bytes` gets 431;
- a head must be complete within `header_timeout_s` of its first byte (of the
  connection's start, for the first request), else 408;
- once the head is in, a gap of `body_timeout_s` without a body byte while we read gets
  408 (or the connection closed, if a response has started);
- at most `max_connections` HTTP connections are open. At the cap, a new connection takes
  the place of the one that has been sending its head the longest, if that has taken more
  than EVICT_AFTER_S (a slow-loris holds connections exactly that way), else of the one
  idle the longest between keep-alive requests, if that has been idle that long (a cheap
  request now and then holds a connection too); if there is none, it gets 503. A
  connection waiting for its response, or reading one, is never closed to make room.
- a response sent before its request's body was read (a refusal by the API) ends the
  connection: the rest of the body is not read and thrown away.

A response's head is written with its body (one write, one TCP segment for a small
response, instead of uvicorn's two): see `_HeadWithBody`.

The idle keep-alive timeout is uvicorn's own (`timeout_keep_alive`). A connection upgraded
to a WebSocket (a supervisor) leaves all of this at the upgrade: it is no longer counted,
and its liveness is the protocol's heartbeats.

Theory of operation: a connection is in one phase at a time.

    head     a head is arriving, or is awaited on a new connection (timer, byte count)
    body     the head is in, the body is arriving (gap timer)
    between  the request is read; its response may still be going out, and once it has,
             the connection is idle (uvicorn's keep-alive timer). The next byte starts
             a head.
    refused  answered with an error and half-closed (not over TLS); what arrives is
             read and dropped until the peer closes, or LINGER_S (so the peer reads the
             answer rather than a reset). Every refusal is counted by reason and logged
             (rate-limited).
    upgraded handed to the WebSocket protocol: out of this module's hands

    head --headers complete--> body --message complete--> between --a byte--> head
    any of head/body/between --a limit, a bad request, or room needed--> refused
    body --answered before the body was read--> refused (without a word more)
    head --WebSocket upgrade--> upgraded
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import msgspec
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from switchboard import metrics
from switchboard.api.errors import ErrorBody
from switchboard.lograte import RateLimitedLog

log = logging.getLogger("switchboard.http")

#: How long a refused connection is read (and dropped) for the peer to close first.
LINGER_S = 2.0
#: A head that has taken this long, or a connection idle this long, may be closed to make
#: room for a new connection.
EVICT_AFTER_S = 1.0


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a request that was refused."""


class HttpLimits(msgspec.Struct, frozen=True):
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000


class Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    BETWEEN = "between"
    REFUSED = "refused"
    UPGRADED = "upgraded"


class _Refusal(msgspec.Struct, frozen=True):
    #: None: the connection is closed without a response.
    status: int | None
    kind: str
    message: str


def _refusals(limits: HttpLimits) -> dict[str, _Refusal]:
    """The answer of each refusal, by the reason label its metric counts it under."""
    return {
        "header_too_large": _Refusal(
            431, "too_large", f"the request head exceeds {limits.max_header_bytes} bytes"
        ),
        "header_timeout": _Refusal(
            408, "timeout", f"the request head took more than {limits.header_timeout_s:g} s"
        ),
        "body_timeout": _Refusal(
            408, "timeout", f"no byte of the request body for {limits.body_timeout_s:g} s"
        ),
        "connection_cap": _Refusal(
            503,
            "unavailable",
            f"{limits.max_connections} connections are open, the most this switchboard takes;"
            " try again later",
        ),
        "slow_head_evicted": _Refusal(
            408,
            "timeout",
            "closed to make room for a new connection: this request head was the slowest",
        ),
        # Idle: closed without a word, as the keep-alive timeout does.
        "idle_evicted": _Refusal(None, "", "closed to make room for a new connection"),
        "bad_request": _Refusal(400, "invalid_request", "invalid HTTP request"),
    }


def _response(refusal: _Refusal, detail: str | None) -> bytes:
    assert refusal.status is not None
    message = f"{refusal.message}: {detail}" if detail else refusal.message
    body = msgspec.json.encode(ErrorBody(refusal.kind, message))
    head = [
        f"HTTP/1.1 {refusal.status} {_PHRASES[refusal.status]}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if refusal.status == 503:
        head.append("retry-after: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_PHRASES = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class ConnectionTable:
    """The HTTP connections of one server: how many are open, which are reading a head
    and which are idle (each oldest first), and the refused ones being closed."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.refusals = _refusals(limits)
        self.open = 0
        #: Connections reading a head, by when it started, and idle connections, by when
        #: they became idle; insertion order is age order.
        self.heads: dict[LimitedHttpProtocol, float] = {}
        self.idle: dict[LimitedHttpProtocol, float] = {}
        #: Refused connections being closed: beyond this many, one is closed at once.
        self.lingering = 0
        self.max_lingering = max(16, limits.max_connections // 8)
        self.log = RateLimitedLog(log)

    def admit(self, now: float) -> bool:
        """Take a slot for a new connection, making room if a slow head or an idle
        connection holds one."""
        if self.open >= self.limits.max_connections:
            for waiting, reason in ((self.heads, "slow_head_evicted"), (self.idle, "idle_evicted")):
                oldest = next(iter(waiting.items()), None)
                if oldest is not None and now - oldest[1] >= EVICT_AFTER_S:
                    oldest[0].refuse(reason)
                    break
            else:
                return False
        self.open += 1
        metrics.HTTP_CONNECTIONS.set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        metrics.HTTP_CONNECTIONS.set(self.open)


class _HeadWithBody:
    """The transport as one response sees it: its first write (the head) is held until
    the next (the body's first piece, which an app sends right after it) and both go out
    as one write, or until the end of the loop's turn if no body comes in it (a stream).
    Everything else is the transport's."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        close: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True
        #: How the response closes the connection when it says it will (see
        #: LimitedHttpProtocol._answer_closing); the transport's own close if None.
        self._close = close or transport.close

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self.flush)
        elif self._held is not None:
            head, self._held = self._held, None
            self._transport.write(head + data)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            head, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (see the module's docstring).
    Passed to uvicorn's Config as `http=functools.partial(LimitedHttpProtocol, table=...)`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        table: ConnectionTable,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.table = table
        self.limits = table.limits
        self.phase = Phase.HEAD
        self._admitted = False
        self._lingering = False
        self._head_bytes = 0
        self._last_body = 0.0
        self._timer: asyncio.TimerHandle | None = None  # the head's, the body's or linger

    # --- phases ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.table.admit(self.loop.time()):
            self.refuse("connection_cap")
            return
        self._admitted = True
        self._start_head()

    def _start_head(self) -> None:
        self.phase = Phase.HEAD
        self._head_bytes = 0
        self.table.heads[self] = self.loop.time()
        self._set_timer(self.limits.header_timeout_s, self._head_too_slow)

    def _end_head(self) -> None:
        self.table.heads.pop(self, None)
        self._cancel_timer()

    def _head_too_slow(self) -> None:
        self._timer = None
        if self.phase is Phase.HEAD:
            self.refuse("header_timeout")

    def _body_check(self) -> None:
        """The body timer: refuse after a gap of body_timeout_s, unless the gap is ours
        (reading paused while the app catches up, or a 100-continue not yet sent)."""
        self._timer = None
        if self.phase is not Phase.BODY:
            return
        now = self.loop.time()
        if self.flow.read_paused or (self.cycle and self.cycle.waiting_for_100_continue):
            self._last_body = now
        quiet = now - self._last_body
        if quiet >= self.limits.body_timeout_s:
            self.refuse("body_timeout")
        else:
            self._set_timer(self.limits.body_timeout_s - quiet, self._body_check)

    def _set_timer(self, delay: float, callback: Callable[[], object]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- input ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # uvicorn's, plus the phases; a parser error is a refusal like the others.
        if self.phase is Phase.REFUSED:
            return  # lingering: dropped
        if self.phase is Phase.BETWEEN:
            self.table.idle.pop(self, None)
            self._start_head()
        if self.phase is Phase.HEAD:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            # Unless a callback refused, and said so (a parser callback changes the phase,
            # which the type checker can't see).
            if self.phase is not Phase.REFUSED:  # type: ignore[comparison-overlap]
                self.refuse("bad_request", str(exc))
            return
        # Checked per read: an unfinished head holds at most the limit plus one read.
        if self.phase is Phase.HEAD and self._head_bytes > self.limits.max_header_bytes:
            self.refuse("header_too_large")
        elif self.phase is Phase.BODY and self._timer is None:
            self._set_timer(self.limits.body_timeout_s, self._body_check)

    def on_message_begin(self) -> None:
        if self.phase is Phase.BETWEEN:  # a pipelined request, in the same read
            self._start_head()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._end_head()
        # The head as parsed, exactly: one read may have held all of a head over the limit.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self.refuse("header_too_large")
            raise _Stop  # stops the parser: the request never reaches the app
        self.phase = Phase.BODY
        self._last_body = self.loop.time()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # this request's (not upgraded)
            cycle.transport = _HeadWithBody(  # type: ignore[assignment]
                self.transport, self.loop, self._close_unread
            )
            cycle.send = self._answer_closing(cycle, cycle.send)  # type: ignore[method-assign,assignment]

    def _answer_closing(
        self, cycle: Any, send: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        """`send` of a request's response, which says `connection: close` when it starts
        before the request's body has all come (a refusal, surely): the rest of the body
        is not read, so the connection can't carry another request, and a client that
        was not told would send its next one on it."""

        async def answer(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False  # uvicorn adds the header, and closes after it
            await send(message)

        return answer

    def _close_unread(self) -> None:
        """The close a response asked for: lingering, as for a refusal, if its request's
        body was not all read (the peer may still be sending it: a close at once could
        reset the connection before the peer read the answer)."""
        if self.phase is Phase.BODY:
            self.phase = Phase.REFUSED
            self._leave()
            self._close_lingering()
        else:
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self._last_body = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.phase is Phase.BODY:
            self.phase = Phase.BETWEEN
            self._cancel_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.phase is Phase.REFUSED or self.transport.is_closing():
            return
        if not self.cycle.response_complete:
            return  # a pipelined request is being answered now
        if self.phase is Phase.BODY:
            # Answered (refused, surely) before its body was read: don't read the rest.
            self.phase = Phase.REFUSED
            self._leave()
            self._close_lingering()
        elif self.phase is Phase.BETWEEN and not self.pipeline:
            self.table.idle[self] = self.loop.time()

    def handle_websocket_upgrade(self) -> None:
        self.phase = Phase.UPGRADED
        self._leave()
        super().handle_websocket_upgrade()

    # --- refusing and closing ---------------------------------------------------------

    def refuse(self, reason: str, detail: str | None = None) -> None:
        """Answer with the refusal of `reason` (unless a response has started: then only
        close), count and log it, and close: half-close and drop input for LINGER_S, or
        at once if too many refused connections are lingering already."""
        if self.phase in (Phase.REFUSED, Phase.UPGRADED):
            return
        refusal = self.table.refusals[reason]
        self.phase = Phase.REFUSED
        self._leave()
        metrics.HTTP_REFUSALS.labels(reason).inc()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self.table.log.warning(
            reason, "refused %s (%s): %s", client, reason, detail or refusal.message
        )
        cycle = self.cycle
        if cycle is not None and isinstance(cycle.transport, _HeadWithBody):
            cycle.transport.flush()  # a head held is sent, as it would have been
        answer = refusal.status is not None and (
            cycle is None or cycle.response_complete or not cycle.response_started
        )
        if cycle is not None and not cycle.response_complete:
            # The app's receive() now says the client left, and its sends go nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        if answer:
            self.transport.write(_response(refusal, detail))
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Half-close, and read and drop what still comes for LINGER_S (the peer reads
        what we sent instead of a reset), or close at once if too many linger already."""
        self.flow.resume_reading()
        if self.table.lingering < self.table.max_lingering:
            self.table.lingering += 1
            self._lingering = True
            if self.transport.can_write_eof():  # not over TLS
                self.transport.write_eof()
            self._set_timer(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _leave(self) -> None:
        """Stop the timer and give the slot back (refused, upgraded or gone)."""
        self._cancel_timer()
        self.table.heads.pop(self, None)
        self.table.idle.pop(self, None)
        if self._admitted:
            self._admitted = False
            self.table.release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        if self._lingering:
            self._lingering = False
            self.table.lingering -= 1
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.phase is Phase.REFUSED:
            self.transport.close()
        else:
            super().shutdown()
