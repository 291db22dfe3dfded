"""A device's serial console, attached interactively (docs/lab.md "Serial console"): a
WebSocket at `/api/v1/devices/{id}/console` relayed to the device's supervisor (protocol
1.6 `console_attach` / `console_input` / `console_data`).

Who: operators and admins, and the holder of the reservation the device belongs to; any
other token gets `403` (counted in `switchboard_console_refusals_total`, logged once). A
refusal is an HTTP answer to the upgrade, with the API's error body.

On the socket, the switchboard sends text messages, each a JSON object: first
`{"type": "attached", "device", "supervisor", "job"}` (`job`: the run holding the device,
`JOB#ATTEMPT`, if any), then `{"type": "data", "job", "offset", "data"}` (base64 of the
bytes the console printed; while a run holds the device they come from its stored stream
`console:<device>` and `offset` is in that stream, else live from the supervisor and
`offset` counts the console's bytes since the supervisor opened it: either way a gap
shows) and, last, `{"type": "closed", "reason"}` before the close. The client sends
binary (or text) messages: bytes to write to the console, at most MAX_INPUT_BYTES each
(best effort: what the tty does not take at once is dropped). A client that does not
keep up (more than console_relay.BUFFER_BYTES waiting, or a send past the switchboard's
send timeout) is dropped with a reason; it never holds up the supervisor's connection. Its
right to attach is looked at again every RECHECK_S: a token revoked or a lease ended ends
the session (4403).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath

from protocol.limits import MAX_CONSOLE_INPUT, console_stream
from switchboard import metrics
from switchboard.api.output import READ_BYTES, _Piece, _pieces
from switchboard.auth import Permission, Role, allows, authenticate
from switchboard.console_relay import ConsoleRelay
from switchboard.lograte import RateLimitedLog
from switchboard.models import DeviceView
from switchboard.state import AppState, app_state

log = logging.getLogger("switchboard.api.console")
_refusal_log = RateLimitedLog(log)

#: Largest message a client may send (bytes to write to the console); it is sent on in
#: pieces of the protocol's console_input cap. Longer: the session is closed (1009).
MAX_INPUT_BYTES = 64 * 1024
#: Close codes the switchboard ends a session with (besides 1000 when the client leaves).
CLOSE_ENDED = 4000  # the supervisor ended it (or its connection ended)
CLOSE_TOO_SLOW = 4005  # the client did not keep up
CLOSE_REVOKED = 4403  # the client may no longer attach (token revoked, lease ended)
_CLOSE_CODES = {"supervisor": CLOSE_ENDED, "too_slow": CLOSE_TOO_SLOW, "revoked": CLOSE_REVOKED}
#: How often an attached client's right to the console is looked at again.
RECHECK_S = 1.0


class _Refused(Exception):
    def __init__(self, status: int, error: str, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.reason = status, error, message, reason


@websocket("/api/v1/devices/{device_id:str}/console")
async def device_console(socket: WebSocket, device_id: FromPath[str]) -> None:
    """Attach to the device's serial console (see the module docstring)."""
    state = app_state(socket)
    try:
        device = await _allowed(state, socket, device_id)
        relay = ConsoleRelay()
        attached = state.hub.attach_console(device.supervisor_id, device_id, relay)
        if isinstance(attached, str):
            raise _Refused(503, "not_connected", attached, "unavailable")
    except _Refused as refused:
        metrics.CONSOLE_REFUSALS.labels(refused.reason).inc()
        _refusal_log.warning(
            refused.reason,
            "refused a console of %s (%d): %s",
            device_id,
            refused.status,
            refused.message,
        )
        await _answer(socket, refused)
        return
    connection, session = attached
    who = socket.state.token
    metrics.CONSOLE_SESSIONS.inc()
    log.info("console of %s attached by %s (%s)", device_id, who.name, who.id)
    ended = "client"
    try:
        await socket.accept()
        hello = {
            "type": "attached",
            "device": device_id,
            "supervisor": device.supervisor_id,
            "job": device.holder,
        }
        await socket.send_text(msgspec.json.encode(hello).decode())
        source = _Source(state, device_id, device.holder, relay)

        async def watch() -> None:
            await _watch(state, socket, device_id, relay)

        ended = await _relay(
            socket, source, connection, session, state.settings.send_timeout_s, watch
        )
    finally:
        connection.detach_console(session)
        metrics.CONSOLE_SESSIONS.dec()
        metrics.CONSOLE_SESSIONS_ENDED.labels(ended).inc()
        log.info("console of %s detached (%s): %s", device_id, ended, relay.ended or "client left")


async def _watch(state: AppState, socket: WebSocket, device_id: str, relay: ConsoleRelay) -> None:
    """Return once the client may no longer attach (its token revoked, the lease it
    attached by ended): the session is ended with why."""
    while relay.ended is None:
        await asyncio.sleep(RECHECK_S)
        try:
            await _allowed(state, socket, device_id)
        except _Refused as refused:
            relay.end(f"no longer allowed: {refused.message}", "revoked")
            log.info("console of %s: %s", device_id, refused.message)
            return


async def _allowed(state: AppState, socket: WebSocket, device_id: str) -> DeviceView:
    token = await authenticate(state.store, socket.headers.get("authorization"))
    if token is None:
        raise _Refused(
            401, "unauthorized", "a valid token is required (Authorization: Bearer)", "forbidden"
        )
    if token.role == Role.SUPERVISOR or not allows(token.role, Permission.VIEW):
        raise _Refused(
            403, "forbidden", f"role {token.role!r} may not attach a console", "forbidden"
        )
    socket.state.token = token
    device = await state.store.get_device(device_id)
    if device is None:
        raise _Refused(404, "not_found", f"no device {device_id!r}", "not_found")
    if not allows(token.role, Permission.OPERATE):
        lease = (
            await state.store.get_reservation(device.reservation)
            if device.reservation is not None
            else None
        )
        if lease is None or lease.owner != token.id:
            raise _Refused(
                403,
                "forbidden",
                f"console of device {device_id}: only an operator or the holder of its lease"
                + (f" ({lease.actor})" if lease is not None else " (it has none)"),
                "forbidden",
            )
    if not device.console:
        raise _Refused(409, "no_console", f"device {device_id} declares no console", "no_console")
    return device


async def _answer(socket: WebSocket, refused: _Refused) -> None:
    """Refuse the upgrade with an HTTP answer (the API's error body)."""
    body = msgspec.json.encode({"error": refused.error, "message": refused.message})
    await socket.send(
        {
            "type": "websocket.http.response.start",
            "status": refused.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await socket.send({"type": "websocket.http.response.body", "body": body, "more_body": False})


class _Source:
    """Where the client's output comes from: while a run holds the device, the run's
    stored stream `console:<device>` (from what is stored when attaching: it survives
    cuts of the supervisor's link as the stream does); otherwise, and once that run has
    ended, the console live from the supervisor (the relay)."""

    def __init__(
        self, state: AppState, device_id: str, holder: str | None, relay: ConsoleRelay
    ) -> None:
        self.state = state
        self.stream = console_stream(device_id)
        self.holder = holder
        self.relay = relay
        relay.paused = holder is not None  # the run's stream carries the same bytes

    async def pieces(self) -> AsyncIterator[tuple[str | None, int, bytes]]:
        """(run, offset, data): offsets in the run's stream while `run` (`JOB#ATTEMPT`)
        is given, in the console's since its supervisor opened it otherwise."""
        job_id, _, attempt_text = (self.holder or "").rpartition("#")
        if job_id and attempt_text.isdigit():
            attempt = int(attempt_text)
            offset = await _stored_length(self.state, job_id, attempt, self.stream)
            async for piece in _pieces(self.state, job_id, self.stream, attempt, offset):
                if self.relay.ended is not None:
                    return  # the session is over (its supervisor's link, too slow)
                if isinstance(piece, _Piece):
                    yield self.holder, piece.offset, piece.data
                elif piece is not None:  # the run ended: the console goes on live
                    break
        self.relay.paused = False
        while (taken := await self.relay.take()) is not None:
            for offset, data in taken:
                yield None, offset, data


async def _stored_length(state: AppState, job_id: str, attempt: int, stream: str) -> int:
    """How many bytes of the run's stream are stored now (read a piece at a time)."""
    size = 0
    while True:
        piece = await state.store.read_output(job_id, attempt, stream, size, size + READ_BYTES)
        size += len(piece)
        if len(piece) < READ_BYTES:
            return size


async def _relay(
    socket: WebSocket,
    source: _Source,
    connection: _Connection,
    session: int,
    send_timeout_s: float,
    watch: Callable[[], Coroutine[Any, Any, None]],
) -> str:
    """Carry the session both ways until one side ends it (or the caller may no longer
    attach, `watch`); who ended it."""
    relay = source.relay
    reader = asyncio.create_task(_read_input(socket, connection, session))
    writer = asyncio.create_task(_write_output(socket, source, send_timeout_s))
    watcher = asyncio.create_task(watch())
    try:
        done, _ = await asyncio.wait({reader, writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            relay.ended_by = "revoked"
            await asyncio.wait({writer}, timeout=1.0)  # it ends at its next piece or tick
            done = {writer}
    finally:
        for task in (reader, writer, watcher):
            task.cancel()
        await asyncio.gather(reader, writer, watcher, return_exceptions=True)
    if writer in done and relay.ended is not None:
        why = relay.ended
        code = _CLOSE_CODES.get(relay.ended_by, CLOSE_TOO_SLOW)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                socket.send_text(msgspec.json.encode({"type": "closed", "reason": why}).decode()),
                send_timeout_s,
            )
            await asyncio.wait_for(socket.close(code, why[:120]), send_timeout_s)
        return relay.ended_by if relay.ended_by in _CLOSE_CODES else "too_slow"
    if reader in done and not reader.cancelled() and reader.result() is not None:
        with contextlib.suppress(Exception):
            await socket.close(1009, reader.result())
    return "client"


class _Connection(Protocol):
    """What the relay needs of the supervisor's connection."""

    def console_input(self, session: int, data: bytes) -> None: ...


async def _read_input(socket: WebSocket, connection: _Connection, session: int) -> str | None:
    """Hand the client's bytes to the supervisor until it leaves (None) or sends a message
    over MAX_INPUT_BYTES (why)."""
    while True:
        try:
            message = await socket.receive()
        except WebSocketDisconnect:
            return None
        if message["type"] == "websocket.disconnect":
            return None
        raw = message.get("bytes")
        text = message.get("text")
        data: bytes = raw if isinstance(raw, bytes) else str(text or "").encode()
        if len(data) > MAX_INPUT_BYTES:
            return f"input messages are at most {MAX_INPUT_BYTES} bytes"
        for start in range(0, len(data), MAX_CONSOLE_INPUT):
            connection.console_input(session, data[start : start + MAX_CONSOLE_INPUT])


async def _write_output(socket: WebSocket, source: _Source, send_timeout_s: float) -> str:
    """Send the console's bytes to the client as they come; why the session ended."""
    relay = source.relay
    async for job, offset, data in source.pieces():
        if relay.ended is not None:
            break
        message = {
            "type": "data",
            "job": job,
            "offset": offset,
            "data": base64.b64encode(data).decode(),
        }
        try:
            await asyncio.wait_for(
                socket.send_text(msgspec.json.encode(message).decode()), send_timeout_s
            )
        except TimeoutError:
            relay.ended, relay.ended_by = (
                f"the client took over {send_timeout_s:g} s to take a message",
                "too_slow",
            )
            break
    return relay.ended or "ended"
