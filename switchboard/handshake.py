"""A supervisor WebSocket from the upgrade request to an admitted Hello.

The upgrade is refused with a plain HTTP error for a missing or wrong token (401) or
subprotocol (400). Once accepted, the first message goes to the protocol's Connection
(which refuses anything but a Hello, and a Hello with no version in common); then the
Hello's claim is checked against the token (switchboard.enrolment) and the store. Every
refusal after the upgrade is the Connection's goodbye: a protocol_error, then the close (or
the same from the WebSocket layer, switchboard.wsprotocol, for a message too big or not
UTF-8); each is counted and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import NamedTuple

import msgspec
from litestar import WebSocket

from protocol import frames, limits
from protocol.connection import Connection, Goodbye, Role
from protocol.exceptions import CloseCode
from protocol.messages import Hello
from switchboard import auth, enrolment, metrics, wsprotocol
from switchboard.config import Settings
from switchboard.lograte import RateLimitedLog
from switchboard.models import Connected
from switchboard.outbox import deadline
from switchboard.store.base import Store
from switchboard.store.errors import ConnectRefused

log = logging.getLogger("switchboard.handshake")


class Admitted(NamedTuple):
    protocol: Connection
    hello: Hello
    #: The tokens the connection stands on (a revoke of any closes it).
    token_ids: tuple[str, ...]
    #: The Hello enrolled its supervisor (the Welcome says so).
    enrolled: bool
    connected: Connected


async def admit(
    socket: WebSocket, store: Store, settings: Settings, refusals: RateLimitedLog
) -> Admitted | None:
    """Take the upgrade and the Hello; None if the connection was refused (and told so)."""
    timeout = settings.send_timeout_s
    token = await auth.authenticate(store, socket.headers.get("authorization"))
    if token is None or not auth.allows(token.role, auth.Permission.CONNECT):
        metrics.SUPERVISOR_REFUSALS.labels("unauthorized").inc()
        refusals.warning("unauthorized", "supervisor connection refused: no valid supervisor token")
        await _refuse(socket, 401, "unauthorized", "a valid supervisor token is required", timeout)
        return None
    offered = socket.scope.get("subprotocols") or []
    if limits.SUBPROTOCOL not in offered:
        await _refuse(
            socket,
            400,
            "unsupported_protocol",
            f"the WebSocket subprotocol {limits.SUBPROTOCOL} is required",
            timeout,
        )
        return None
    async with deadline(socket, timeout):
        await socket.accept(subprotocols=limits.SUBPROTOCOL)
    protocol = Connection(Role.SWITCHBOARD)
    hello = await _first_message(socket, protocol, settings.hello_timeout_s)
    if not isinstance(hello, Hello):
        if hello is not None:
            _protocol_error(hello.code, hello.reason)
        await say_goodbye(socket, hello, timeout)
        return None
    try:
        admission = enrolment.admit(token, hello)
        try:
            connected = await store.supervisor_connected(
                hello, token_id=token.id, enrol=admission.enrol
            )
        except ConnectRefused as exc:
            raise enrolment.refusal(exc, hello.supervisor_id) from None
    except enrolment.Refused as refused:
        metrics.SUPERVISOR_REFUSALS.labels(refused.reason).inc()
        log.warning(
            "supervisor %s refused (token %s): %s", hello.supervisor_id, token.id, refused.message
        )
        await say_goodbye(socket, protocol.fail(CloseCode.UNAUTHORIZED, refused.message), timeout)
        return None
    if admission.enrol is not None:
        metrics.SUPERVISOR_ENROLMENTS.inc()
        log.info(
            "supervisor %s enrolled with registration token %s (credential %s)",
            hello.supervisor_id,
            token.id,
            admission.enrol.token_id,
        )
    if connected.devices_refused:
        # Two hosts claim one device id: the first keeps it (docs/lab.md).
        metrics.DEVICES_REFUSED.inc(len(connected.devices_refused))
        log.warning(
            "supervisor %s declares devices another supervisor declares already, not taken: %s",
            hello.supervisor_id,
            ", ".join(connected.devices_refused),
        )
    return Admitted(protocol, hello, admission.token_ids, admission.enrol is not None, connected)


async def _first_message(
    socket: WebSocket, protocol: Connection, timeout_s: float
) -> Hello | Goodbye | None:
    try:
        message = await asyncio.wait_for(socket.receive(), timeout_s)
    except TimeoutError:
        return protocol.fail(CloseCode.HANDSHAKE_FAILED, "no hello within the time limit")
    if message["type"] == "websocket.disconnect":
        protocol.lost()
        if (refused := wsprotocol.refusal(message)) is not None:
            _protocol_error(*refused)  # refused by the WebSocket layer, which told the peer
        return None  # gone: nothing to say
    received = frames.receive(protocol, wsprotocol.message_data(message))
    assert isinstance(received, Hello | Goodbye), "the table lets nothing else through"
    return received


def _protocol_error(code: int, reason: str) -> None:
    """The first message was refused (the peer was told): counted, and logged once."""
    metrics.PROTOCOL_ERRORS.labels(str(code)).inc()
    log.warning("supervisor connection refused before its hello: %s (%d)", reason, code)


async def say_goodbye(socket: WebSocket, goodbye: Goodbye | None, send_timeout_s: float) -> None:
    """Send a goodbye outside an outbox (before the connection is served): the
    protocol_error, then the close. Never raises: the peer may already be gone."""
    if goodbye is None:
        return
    with contextlib.suppress(Exception):
        async with deadline(socket, send_timeout_s):
            await socket.send({"type": "websocket.send", "text": goodbye.frame.decode()})
            await socket.close(int(goodbye.code), goodbye.close_reason)


async def _refuse(
    socket: WebSocket, status: int, error: str, message: str, send_timeout_s: float
) -> None:
    """Answer the upgrade request with a plain HTTP error instead of accepting it."""
    await socket.receive()  # websocket.connect
    body = msgspec.json.encode({"error": error, "message": message})
    async with deadline(socket, send_timeout_s):
        await socket.send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await socket.send({"type": "websocket.http.response.body", "body": body})
