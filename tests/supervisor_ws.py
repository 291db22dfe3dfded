"""A supervisor's WebSocket opened by hand, for tests that speak the protocol themselves."""

from __future__ import annotations

import json

import websockets
from websockets.exceptions import ConnectionClosed

from protocol import codec, limits
from protocol.messages import Hello, Welcome
from protocol.tokens import new_token, token_sha256
from protocol.versions import supported_versions
from tests.harness import Switchboard


def connect_ws(switchboard: Switchboard, token: str | None, subprotocols=(limits.SUBPROTOCOL,)):
    """Open the supervisor endpoint with `token` (none: no Authorization header)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return websockets.connect(
        f"{switchboard.ws_url}/ws/supervisor",
        additional_headers=headers,
        subprotocols=[websockets.Subprotocol(p) for p in subprotocols],
        max_size=None,
    )


async def handshake(ws, supervisor_id: str) -> Welcome:
    """Hello, Welcome. The Hello offers a new credential's digest, so a registration token
    enrols a new id (a bound token ignores it)."""
    hello = Hello(
        supervisor_id=supervisor_id,
        name=supervisor_id,
        versions=supported_versions(),
        credential_sha256=token_sha256(new_token()).hex(),
    )
    await ws.send(codec.encode(hello), text=True)
    welcome = codec.decode_from_switchboard(await ws.recv(decode=False))
    assert isinstance(welcome, Welcome)
    return welcome


async def closed_with(ws) -> tuple[int, str, list[dict]]:
    """Read until the server closes; return the close code, reason and any JSON it sent."""
    seen = []
    try:
        async for frame in ws:
            seen.append(json.loads(frame))
    except ConnectionClosed:
        pass
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or "", seen
